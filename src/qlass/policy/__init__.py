"""Policies: the batch-first sampling protocol and its backends.

``load_policy(spec)`` builds one from a local causal-LM folder (:class:`HFPolicy`), ``default`` (the
offline default model), or the base URL of an OpenAI-compatible server (``http(s)://host:port/v1``,
:class:`OpenAIPolicy`). The backends are imported lazily (``from qlass.policy import HFPolicy``
works, but importing the package loads neither torch models nor HTTP code).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Policy

if TYPE_CHECKING:
    from .hf import HFPolicy
    from .openai import OpenAIPolicy

__all__ = ["HFPolicy", "OpenAIPolicy", "Policy", "check_policy_options", "check_policy_spec", "is_class_spec",
           "load_policy"]


def __getattr__(name: str) -> Any:
    if name == "HFPolicy":
        from .hf import HFPolicy

        return HFPolicy
    if name == "OpenAIPolicy":
        from .openai import OpenAIPolicy

        return OpenAIPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_CLASS_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _is_server(spec: str) -> bool:
    """Whether ``spec`` names an OpenAI-compatible server (else a model folder or ``default``); a URL of another
    scheme is a :class:`QlassError`."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        from ..errors import QlassError

        raise QlassError(f"model {spec!r}: unsupported URL scheme {scheme.group(1)!r}; give a model folder, "
                         "'default' or an OpenAI-compatible server's http(s)://host:port/v1 URL")
    return spec.lower().startswith(("http://", "https://"))


def spec_text(spec: str | os.PathLike[str]) -> str:
    """A policy spec as text: a model folder given as a ``Path`` becomes its path; anything but a string or a path
    is a :class:`QlassError` (was "expected string or bytes-like object" from a regular expression)."""
    spec = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    if not isinstance(spec, str):
        from ..errors import QlassError

        raise QlassError(f"a policy is a model folder, 'default', a server URL or package.module:Class; got {spec!r}")
    return spec


def is_class_spec(spec: str) -> bool:
    """Whether a policy spec names a user's own class (``package.module:Class``), not a model or server."""
    return bool(_CLASS_SPEC.match(spec)) and not Path(spec).exists()


def check_policy_options(spec: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Raise :class:`QlassError` if the backend that would serve ``spec`` (a model folder or server) does
    not take every key of ``options`` (naming the options it does take), or one has a value of the wrong
    type or out of its range. Returns the options as the backend takes them (a float option given as a
    numeric string, as YAML reads ``1e-3``, converted). A user's class checks its options itself
    (:class:`~qlass.policy.user.UserPolicy`)."""
    from ..config import check_call_options
    from .option_values import check_hf_options, check_openai_options, hf_policy_options

    if _is_server(spec):
        from .openai import OpenAIPolicy

        target, name, given, check_values = OpenAIPolicy, "OpenAIPolicy", "base_url", check_openai_options
    else:  # HFPolicy's parameters, read without importing torch
        target, name, given, check_values = hf_policy_options, "HFPolicy", "model_dir", check_hf_options
    checked = check_call_options(target, options, name, skip=(given,))
    check_values(checked)
    return checked


def check_policy_spec(spec: str | os.PathLike[str], options: Mapping[str, Any]) -> None:
    """Refuse a policy ``spec`` that names no model folder, server URL or class, or ``options`` its backend does
    not take (:func:`check_policy_options`), without loading anything (a command checks them before it makes
    its output folder)."""
    from ..file_checks import refuse_classifier, require_model_folder
    from .loading import require_tokenizer_files

    spec = spec_text(spec)
    if is_class_spec(spec):
        return
    check_policy_options(spec, options)
    if spec != "default" and not _is_server(spec):
        require_model_folder(Path(spec), f"{spec}: not a model folder (no config.json); a policy is a model "
                                         "folder, 'default', a server URL or package.module:Class")
        refuse_classifier(Path(spec))
        require_tokenizer_files(Path(spec))


def load_policy(spec: str | os.PathLike[str], **options: Any) -> Policy:
    """A policy from a model folder, ``default``, an ``http(s)://.../v1`` server URL, or a user's own
    class named ``package.module:Class`` (built and checked by :class:`~qlass.policy.user.UserPolicy`).

    ``options`` go to the backend's constructor (:class:`HFPolicy` or :class:`OpenAIPolicy`, e.g.
    ``autocast=True`` or ``model="name", tokenizer="DIR"``; a user's class: the options it declares);
    an option the backend does not take is an error naming the options it does take.
    """
    spec = spec_text(spec)
    if is_class_spec(spec):
        from .user import UserPolicy

        return UserPolicy(spec, dict(options))  # type: ignore[return-value]
    options = check_policy_options(spec, options)
    if spec == "default":
        from ..models import default_model_dir

        spec = str(default_model_dir())
    if _is_server(spec):
        from .openai import OpenAIPolicy

        return OpenAIPolicy(spec, **options)  # type: ignore[return-value]
    from .hf import HFPolicy

    return HFPolicy(spec, **options)  # type: ignore[return-value]
