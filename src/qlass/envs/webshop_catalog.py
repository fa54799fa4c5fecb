"""WebShop's product catalog: loading either data layout into compact product records.

Two layouts are read, both streamed record by record (nothing holds the raw file in memory):

- the *processed* layout: JSON Lines (optionally ``.xz``) of ``{"id", "contents", "product"}``
  records, where ``product`` is the record WebShop's loader builds (``Title``, ``Description``,
  ``BulletPoints``, ``pricing`` as numbers, ``options``, ``Attributes``, ...) and ``contents`` the
  text its search index holds — the form of ``products_1k.jsonl.xz``;
- WebShop's *original* files: ``items_shuffle*.json`` (a JSON list of scraped products: ``name``,
  ``full_description``, ``small_description``, ``pricing`` as a ``"$a$b"`` string,
  ``customization_options``, ...) processed the way WebShop's loader does (ASIN filter and
  de-duplication, price parsing, lower-cased option values with ``/`` shown as `` | ``), with the
  attribute file ``items_ins_v2*.json`` and, optionally, a reviews file.

Each product becomes a :class:`Product` holding only what pages, search and reward read; the search
text is handed to the indexer as it streams past and not kept.
"""

from __future__ import annotations

import json
import lzma
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, MissingFileError

PROCESSED_NAMES = ("products_1k.jsonl.xz", "products_1k.jsonl", "products.jsonl.xz", "products.jsonl")
ORIGINAL_NAMES = ("items_shuffle_1000.json", "items_shuffle.json")
ATTRIBUTE_NAMES = ("items_ins_v2_1000.json", "items_ins_v2.json")
DEFAULT_PRICE = 100.0
_CHUNK = 1 << 20
_MAX_RECORD_CHARS = 64 << 20


@dataclass(slots=True)
class Product:
    """One product as the shop shows and scores it."""

    asin: str
    title: str
    description: str
    bullet_points: list[str]
    price_tag: str
    pricing: list[float]
    options: dict[str, list[str]]
    attributes: list[str]
    category: str
    query: str
    product_category: str
    rating: str = "N.A."
    reviews: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Instruction:
    """A product's synthetic-goal seed from ``items_ins_v2``."""

    text: str
    attributes: tuple[str, ...]


UNREADABLE = (lzma.LZMAError, EOFError, UnicodeDecodeError)
"""What reading a damaged or cut ``.xz`` file, or bytes that are not text, raises."""


def unreadable(path: Path, exc: Exception) -> DataError:
    """The error for a data file that raised one of :data:`UNREADABLE`, naming it."""
    return DataError(str(path), f"cannot be read ({type(exc).__name__}: {exc})")


def _open_text(path: Path):
    return lzma.open(path, "rt", encoding="utf-8") if path.suffix == ".xz" else open(path, encoding="utf-8")


def iter_json_array(path: Path, what: str = "products") -> Iterator[Any]:
    """Yield the elements of a top-level JSON list (of ``what``) one at a time, reading the file in chunks."""
    decoder = json.JSONDecoder()
    with _open_text(path) as fh:
        buf = fh.read(_CHUNK)
        pos = len(buf) - len(buf.lstrip())
        if not buf[pos:pos + 1] == "[":
            raise DataError(str(path), f"expected a JSON list of {what}")
        pos += 1
        index = 0
        eof = False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if eof or len(buf) - pos > _MAX_RECORD_CHARS:
                    raise DataError(str(path), f"invalid JSON: {exc.msg}", index=index) from None
                more = fh.read(_CHUNK)
                eof = not more
                buf = buf[pos:] + more
                pos = 0
                continue
            if end == len(buf) and not eof:  # a number may continue in the next chunk
                more = fh.read(_CHUNK)
                eof = not more
                if more:
                    buf, pos = buf[pos:] + more, 0
                    continue
            yield obj
            index += 1
            pos = end


def _require(rec: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path, index: int) -> Any:
    value = rec.get(key)
    if not isinstance(value, kind):
        raise DataError(str(path), f"field {key!r}: missing or not {kind}", index=index, record_id=rec.get("asin"))
    return value


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def product_from_processed(rec: Any, path: Path, index: int) -> tuple[Product, str]:
    """A :class:`Product` and its search text from one processed-layout record."""
    if not isinstance(rec, dict):
        raise DataError(str(path), "expected a JSON object", index=index)
    contents = _require(rec, "contents", str, path, index)
    p = _require(rec, "product", dict, path, index)
    p.setdefault("asin", rec.get("id"))
    pricing = [float(x) for x in _require(p, "pricing", list, path, index)] or [DEFAULT_PRICE]
    options = _require(p, "options", dict, path, index)
    product = Product(
        asin=str(_require(p, "asin", str, path, index)).upper(),
        title=_require(p, "Title", str, path, index),
        description=str(p.get("Description") or ""),
        bullet_points=_as_list(p.get("BulletPoints")),
        price_tag=str(p.get("Price") or f"${pricing[0]}"),
        pricing=pricing[:2],
        options={str(k): [str(v) for v in vs] for k, vs in options.items()},
        attributes=_as_list(p.get("Attributes")) or ["DUMMY_ATTR"],
        category=str(p.get("category") or ""),
        query=str(p.get("query") or "").lower().strip(),
        product_category=str(p.get("product_category") or ""),
        rating=str(p.get("Rating") or "N.A."),
        reviews=list(p.get("Reviews") or []),
    )
    return product, contents


_PRICE_CHARS = re.compile(r"[^\d.]")


def _parse_pricing(raw: Any, path: Path, index: int, asin: str) -> tuple[list[float], str]:
    """WebShop's price parsing: ``"$12.99$15.00"`` → ``[12.99, 15.0]`` and its price tag."""
    if not raw:
        return [DEFAULT_PRICE], f"${DEFAULT_PRICE}"
    try:
        values = [float(_PRICE_CHARS.sub("", part)) for part in str(raw).split("$")[1:]]
    except ValueError:
        raise DataError(str(path), f"field 'pricing': cannot read a price from {raw!r}", index=index,
                        record_id=asin) from None
    if not values:
        return [DEFAULT_PRICE], f"${DEFAULT_PRICE}"
    if len(values) == 1:
        return values, f"${values[0]}"
    return values[:2], f"${values[0]} to ${values[1]}"


def _parse_options(raw: Any) -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    if not isinstance(raw, dict):
        return options
    for name, contents in raw.items():
        if contents is None:
            continue
        options[str(name).lower()] = [str(c["value"]).strip().replace("/", " | ").lower()
                                      for c in contents if isinstance(c, dict) and "value" in c]
    return options


def search_text(product: Product) -> str:
    """The text WebShop indexes for a product: title, description, first feature, options."""
    option_text = ", and ".join(f"{name}: {', '.join(values)}" for name, values in product.options.items())
    first = product.bullet_points[0] if product.bullet_points else ""
    return " ".join([product.title, product.description, first, option_text]).lower()


def product_from_original(rec: Any, path: Path, index: int, attributes: dict[str, Any],
                          reviews: dict[str, tuple[list[dict[str, Any]], str]]) -> Product | None:
    """Process one ``items_shuffle`` record as WebShop's loader does; ``None`` for a skipped ASIN."""
    if not isinstance(rec, dict):
        raise DataError(str(path), "expected a JSON object", index=index)
    asin = str(rec.get("asin", ""))
    if asin == "nan" or not asin or len(asin) > 10:
        return None
    pricing, price_tag = _parse_pricing(rec.get("pricing"), path, index, asin)
    found = attributes.get(asin)
    attrs = found.get("attributes") if isinstance(found, dict) else None
    product_reviews, rating = reviews.get(asin, ([], "N.A."))
    return Product(
        asin=asin.upper(),
        title=str(_require(rec, "name", str, path, index)),
        description=str(rec.get("full_description") or ""),
        bullet_points=_as_list(rec.get("small_description")),
        price_tag=price_tag,
        pricing=pricing,
        options=_parse_options(rec.get("customization_options")),
        attributes=[str(a) for a in attrs] if attrs else ["DUMMY_ATTR"],
        category=str(rec.get("category") or ""),
        query=str(rec.get("query") or "").lower().strip(),
        product_category=str(rec.get("product_category") or ""),
        rating=str(rating),
        reviews=product_reviews,
    )


def load_attributes(path: Path) -> dict[str, Any]:
    """``items_ins_v2``: ASIN → ``{"attributes", "instruction", "instruction_attributes"}``."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise MissingFileError(str(path)) from None
    except json.JSONDecodeError as exc:
        raise DataError(str(path), f"invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except UNREADABLE as exc:
        raise unreadable(path, exc) from None
    if not isinstance(data, dict):
        raise DataError(str(path), "expected a JSON object mapping ASIN to attributes")
    return data


def load_reviews(path: Path) -> dict[str, tuple[list[dict[str, Any]], str]]:
    """WebShop's reviews file: a JSON list of ``{"asin", "reviews", "average_rating"}``."""
    out: dict[str, tuple[list[dict[str, Any]], str]] = {}
    try:
        for i, rec in enumerate(iter_json_array(path, "reviews")):
            if not isinstance(rec, dict) or "asin" not in rec:
                raise DataError(str(path), "expected an object with 'asin'", index=i)
            given = rec.get("reviews") or []
            if not isinstance(given, list) or not all(isinstance(r, dict) for r in given):
                raise DataError(str(path), "field 'reviews': expected a list of objects", index=i,
                                record_id=str(rec["asin"]))
            items = [{"title": r.get("title", ""), "score": r.get("score", r.get("stars", "")),
                      "body": r.get("body", r.get("review", ""))} for r in given]
            out[str(rec["asin"])] = (items, str(rec.get("average_rating") or "N.A."))
    except UNREADABLE as exc:
        raise unreadable(path, exc) from None
    return out


def instructions_from(attributes: dict[str, Any], path: Path) -> dict[str, Instruction]:
    """The products that carry a synthetic instruction, ASIN → :class:`Instruction`."""
    out: dict[str, Instruction] = {}
    for asin, rec in attributes.items():
        if not isinstance(rec, dict) or not rec.get("instruction"):
            continue
        attrs = rec.get("instruction_attributes")
        if not isinstance(attrs, list) or not attrs:
            raise DataError(str(path), "field 'instruction_attributes': an instruction needs a non-empty list",
                            record_id=asin)
        out[asin.upper()] = Instruction(str(rec["instruction"]), tuple(str(a) for a in attrs))
    return out


def find_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    """The first of ``names`` present in ``folder``."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DataError(str(folder), f"no {what} file found (looked for {', '.join(names)})")


def iter_catalog(products_file: Path, attributes: dict[str, Any],
                 reviews: dict[str, tuple[list[dict[str, Any]], str]] | None = None,
                 num_products: int | None = None) -> Iterator[tuple[Product, str]]:
    """Stream ``(product, search text)`` pairs from either layout (chosen by the file name: JSON
    Lines for the processed one, a JSON list for the original), first occurrence of each ASIN only,
    at most ``num_products`` records read (WebShop's ``num_products`` takes the first N)."""
    seen: set[str] = set()
    processed = ".jsonl" in products_file.name
    if processed:
        def records() -> Iterator[Any]:
            with _open_text(products_file) as fh:
                for lineno, line in enumerate(fh, start=1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise DataError(str(products_file), f"line {lineno}: invalid JSON ({exc.msg})") from None
        source = records()
    else:
        source = iter_json_array(products_file)
    try:
        for index, rec in enumerate(source):
            if num_products is not None and index >= num_products:
                break
            if processed:
                product, text = product_from_processed(rec, products_file, index)
            else:
                made = product_from_original(rec, products_file, index, attributes, reviews or {})
                if made is None:
                    continue
                product, text = made, search_text(made)
            if product.asin in seen:
                continue
            seen.add(product.asin)
            yield product, text
    except UNREADABLE as exc:
        raise unreadable(products_file, exc) from None
