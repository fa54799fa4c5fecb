/* qlass view: draws the data block of this page (trees, episodes, decisions, results).
 *
 * Every text that comes from the data is put in the page with textContent (or an SVG text node):
 * nothing from the data is ever parsed as HTML. The page makes no network request.
 *
 * Options in the address's #fragment, joined by '&':
 *   tab=trees|episodes|decisions|results   the tab shown first
 *   expand=all                             open every tree, node, task card and method
 *   node=T:I                               open tree T (0-based) at node I and show its details
 *   bench=N                                time each tree's first view and full expansion N times (the
 *                                          fastest run is stored in data-ms-initial / data-ms-full)
 */
(function () {
  "use strict";

  var D = JSON.parse(document.getElementById("qlass-data").textContent);
  var OPT = parseHash(location.hash);
  var EXPAND_ALL = OPT.expand === "all";
  var INITIAL_VISIBLE = 150;   // nodes a tree shows before the user opens more
  var INITIAL_CARDS = 8;       // task cards opened at load
  var KIDS_PAGE = 100;         // children drawn at once under one node
  var SVG = "http://www.w3.org/2000/svg";  // the SVG namespace name (nothing is fetched)

  function parseHash(hash) {
    // an option that does not decode (a stray '%') is left out, not the whole page
    var out = Object.create(null);
    String(hash || "").replace(/^#/, "").split("&").forEach(function (part) {
      if (!part) return;
      var i = part.indexOf("=");
      try {
        var k = decodeURIComponent(i < 0 ? part : part.slice(0, i));
        out[k] = i < 0 ? "1" : decodeURIComponent(part.slice(i + 1));
      } catch (err) { /* URIError: ignored */ }
    });
    return out;
  }
  function has(obj, key) { return Object.prototype.hasOwnProperty.call(obj, key); }

  // -- small DOM helpers (text only) ------------------------------------------------------------
  function h(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function add(parent) {
    for (var i = 1; i < arguments.length; i++) {
      var k = arguments[i];
      if (k === null || k === undefined || k === false) continue;
      parent.appendChild(typeof k === "object" ? k : document.createTextNode(String(k)));
    }
    return parent;
  }
  function isNum(x) { return typeof x === "number" && isFinite(x); }
  function num(x, d) { return isNum(x) ? x.toFixed(d === undefined ? 3 : d) : "–"; }
  function pct(x) { return isNum(x) ? (100 * x).toFixed(1) : "–"; }
  function int(x) { return isNum(x) ? Math.round(x).toLocaleString("en-US") : "–"; }
  function plural(n, word) { return int(n) + " " + word + (n === 1 ? "" : "s"); }
  function chip(text, cls) { return h("span", "chip" + (cls ? " " + cls : ""), text); }
  function oneLine(s, n) {
    s = String(s === null || s === undefined ? "" : s).replace(/\s+/g, " ").trim();
    return s.length > n ? s.slice(0, n - 1) + "…" : s;
  }
  function pre(text, cls) { return h("pre", cls || "", text === null || text === undefined ? "" : text); }
  function kv(box, k, v) { add(box, h("span", "k", k), h("span", "v", v)); }
  function rewardChip(r, success) {
    return chip("reward " + num(r, 2), success ? "good" : (isNum(r) && r > 0 ? "warn" : "bad"));
  }
  function table(head, rows, rowClass) {
    var t = h("table", "grid"), tr = h("tr");
    head.forEach(function (c) { tr.appendChild(h("th", "", c)); });
    add(t, add(h("thead"), tr));
    var body = h("tbody");
    rows.forEach(function (row, i) {
      var r = h("tr", rowClass ? rowClass(i) : "");
      row.forEach(function (c) {
        if (c instanceof Node) { r.appendChild(add(h("td"), c)); return; }
        var isN = c && typeof c === "object" && "n" in c;
        var td = h("td", isN ? "num" + (c.cls ? " " + c.cls : "") : "", isN ? c.n : c);
        r.appendChild(td);
      });
      body.appendChild(r);
    });
    return add(t, body);
  }
  function N(text, cls) { return { n: text, cls: cls }; }
  function option(sel, value, label) { var o = h("option", "", label); o.value = value; sel.appendChild(o); return o; }
  function actionOf(output) {
    var m = /Action:[^\S\n]*([^\n]*)/.exec(String(output || ""));
    return m ? m[1].trim() : null;
  }
  function thoughtOf(output) {
    return String(output || "").split("\n").filter(function (l) { return !/^\s*Action:/.test(l); }).join("\n").trim();
  }

  // -- trees ------------------------------------------------------------------------------------
  function prepTree(t) {
    var n = t.nodes.length, kids = [], size = new Int32Array(n), i;
    for (i = 0; i < n; i++) { kids.push([]); size[i] = 1; }
    for (i = 1; i < n; i++) kids[t.nodes[i].parent].push(i);
    for (i = n - 1; i > 0; i--) size[t.nodes[i].parent] += size[i];
    var contrast = new Uint8Array(n), mark = new Array(n);
    for (i = 0; i < n; i++) {
      var qs = kids[i].filter(function (c) { return t.nodes[c].rollout === 0 && isNum(t.nodes[c].q); });
      if (qs.length < 2) continue;
      var vals = qs.map(function (c) { return t.nodes[c].q; });
      var hi = Math.max.apply(null, vals), lo = Math.min.apply(null, vals);
      if (hi - lo <= 1e-9) continue;
      contrast[i] = 1;
      qs.forEach(function (c) {
        if (Math.abs(t.nodes[c].q - hi) <= 1e-9) mark[c] = "q-best";
        else if (Math.abs(t.nodes[c].q - lo) <= 1e-9) mark[c] = "q-worst";
      });
    }
    t._kids = kids; t._size = size; t._contrast = contrast; t._mark = mark;
    t._open = new Uint8Array(n); t._els = new Array(n);
  }

  function openBudget(t, budget) {
    // Breadth-first: open a node while its children still fit in the budget of visible nodes.
    t._open.fill(0);
    t._full = false;
    var visible = 1, queue = [0], head = 0;
    while (head < queue.length) {
      var id = queue[head++], k = t._kids[id];
      var m = Math.min(k.length, KIDS_PAGE);
      if (!m || (id !== 0 && visible + m > budget)) continue;
      t._open[id] = 1;
      visible += m;
      for (var j = 0; j < m; j++) queue.push(k[j]);
    }
    return visible;
  }

  function expandAll(t) { t._open.fill(1); t._full = true; }

  function qStyle(el, q) {
    if (!isNum(q)) return;
    var v = Math.max(0, Math.min(1, q));
    el.style.background = "hsl(" + Math.round(120 * v) + ", 65%, 86%)";
  }

  function nodeEl(t, id) {
    var nd = t.nodes[id], k = t._kids[id];
    var wrap = h("div", "node" + (t._mark[id] ? " " + t._mark[id] : ""));
    wrap.setAttribute("data-id", id);
    var row = h("div", "row");
    var tog = h("span", "tog", k.length ? (t._open[id] ? "▾" : "▸ " + (t._size[id] - 1)) : "·");
    add(row, tog, h("span", "nid", "#" + id),
      h("span", "src src-" + nd.source, nd.source === "rollout" && nd.rollout ? "rollout " + nd.rollout : nd.source));
    if (nd.pruned) row.appendChild(h("span", "flag pruned", "pruned"));
    if (nd.merged) row.appendChild(h("span", "flag merged", "merged ×" + nd.merged));
    if (id !== 0 && nd.reward >= 1 - 1e-9) row.appendChild(h("span", "flag win", "success"));
    else if (nd.done) row.appendChild(h("span", "flag done", "done"));
    if (id !== 0) {
      var q = h("span", "q", "Q " + num(nd.q));
      qStyle(q, nd.q);
      add(row, q, h("span", "r", "r " + num(nd.reward, 2)));
    }
    add(row, h("span", "act", id === 0 ? "task" : (nd.action === null ? "(no action) " + oneLine(nd.output, 60) : nd.action)),
      h("span", "obs", oneLine(nd.observation, 140)));
    wrap.appendChild(row);
    if (k.length && t._open[id]) wrap.appendChild(kidsEl(t, id));
    t._els[id] = wrap;
    return wrap;
  }

  function kidsEl(t, id) {
    // A node with many children shows them KIDS_PAGE at a time (all of them after "expand all").
    var k = t._kids[id];
    var box = h("div", "kids" + (k.length === 1 ? " chain" : "") + (t._contrast[id] ? " contrast" : ""));
    var shown = t._full ? k.length : Math.min(k.length, KIDS_PAGE);
    for (var j = 0; j < shown; j++) box.appendChild(nodeEl(t, k[j]));
    if (shown < k.length) box.appendChild(moreEl(t, id, box, shown));
    return box;
  }

  function moreEl(t, id, box, shown) {
    var k = t._kids[id], more = h("div", "more");
    var b = h("button", "small", "show " + Math.min(KIDS_PAGE, k.length - shown) + " more of " + (k.length - shown) + " siblings");
    b.type = "button";
    b.addEventListener("click", function (ev) {
      ev.stopPropagation();
      box.removeChild(more);
      var end = Math.min(k.length, shown + KIDS_PAGE);
      for (var j = shown; j < end; j++) box.appendChild(nodeEl(t, k[j]));
      if (end < k.length) box.appendChild(moreEl(t, id, box, end));
    });
    more.appendChild(b);
    return more;
  }

  function toggleNode(t, id) {
    var wrap = t._els[id], k = t._kids[id];
    if (!wrap || !k.length) return;
    var tog = wrap.firstChild.firstChild;
    if (t._open[id]) {
      t._open[id] = 0;
      if (wrap.lastChild.classList.contains("kids")) wrap.removeChild(wrap.lastChild);
      tog.textContent = "▸ " + (t._size[id] - 1);
    } else {
      t._open[id] = 1;
      wrap.appendChild(kidsEl(t, id));
      tog.textContent = "▾";
    }
  }

  function drawOutline(t) {
    t._outline.textContent = "";
    t._els = new Array(t.nodes.length);
    t._outline.appendChild(nodeEl(t, 0));
    void t._outline.offsetHeight;  // lay it out now, so a timing includes layout
  }

  var detail = null, selected = null;
  function showNode(t, id) {
    if (selected) selected.classList.remove("selected");
    selected = t._els[id] ? t._els[id].firstChild : null;
    if (selected) selected.classList.add("selected");
    var nd = t.nodes[id];
    detail.textContent = "";
    add(detail, h("h3", "", t.task + " · node #" + id));
    var box = h("div", "kv");
    kv(box, "source", nd.source + (nd.source === "rollout" ? " (chain " + nd.rollout + ")" : ""));
    kv(box, "parent", nd.parent === null ? "–" : "#" + nd.parent);
    kv(box, "depth", nd.depth);
    kv(box, "Q", num(nd.q, 4));
    kv(box, "reward", num(nd.reward, 3));
    kv(box, "done", nd.done ? "yes" : "no");
    kv(box, "expanded", nd.expanded ? "yes" : "no");
    kv(box, "pruned", nd.pruned ? "yes" : "no");
    if (nd.merged) kv(box, "merged", nd.merged);
    kv(box, "env steps", nd.env_steps);
    kv(box, "tokens", nd.tokens);
    kv(box, "subtree", (t._size[id] - 1) + " nodes below");
    detail.appendChild(box);
    if (id !== 0) add(detail, h("div", "dim", "agent output"), pre(nd.output));
    add(detail, h("div", "dim", id === 0 ? "task and first observation" : "observation"), pre(nd.observation));
    if (nd.parent !== null) {
      var sibs = t._kids[nd.parent];
      if (sibs.length > 1) {
        add(detail, h("div", "dim", "siblings (same state, different actions)"));
        var best = -Infinity;
        sibs.forEach(function (c) { if (isNum(t.nodes[c].q) && t.nodes[c].rollout === 0) best = Math.max(best, t.nodes[c].q); });
        var tbl = table(["#", "source", "action", "Q", "reward"], sibs.map(function (c) {
          var s = t.nodes[c];
          var a = h("a", "", s.action === null ? "(no action)" : s.action);
          a.addEventListener("click", function () { revealNode(t, c); });
          a.style.cursor = "pointer";
          return [String(c), s.source, a, N(num(s.q), "val"), N(num(s.reward, 2))];
        }), function (i) {
          var c = sibs[i];
          return (c === id ? "chosen" : "") + (isNum(t.nodes[c].q) && Math.abs(t.nodes[c].q - best) <= 1e-9 ? " best" : "");
        });
        detail.appendChild(tbl);
      }
    }
  }

  function revealNode(t, id) {
    var chain = [], p = t.nodes[id].parent;
    while (p !== null) { chain.push(p); p = t.nodes[p].parent; }
    chain.reverse().forEach(function (a) { if (!t._open[a]) toggleNode(t, a); });
    chain.concat([id]).forEach(function (n) {  // a node past its parent's first page of children: page it in
      var more;
      while (!(t._els[n] && t._els[n].isConnected) && t.nodes[n].parent !== null && t._els[t.nodes[n].parent] &&
             (more = t._els[t.nodes[n].parent].querySelector(":scope > .kids > .more > button"))) more.click();
    });
    if (t._els[id]) t._els[id].scrollIntoView({ block: "center" });
    showNode(t, id);
  }

  function renderTrees(panel) {
    var bar = h("div", "toolbar");
    var filter = h("input");
    filter.type = "text"; filter.placeholder = "filter tasks";
    var openAll = h("button", "small", "open all trees"), closeAll = h("button", "small", "close all trees");
    add(bar, add(h("label"), "task ", filter), openAll, closeAll,
      h("span", "legend", "Each row: node, source, marks, Q (colour: 0 red … 1 green), reward, action, observation. " +
        "Orange bars: sibling groups whose Q values differ (outlined: best and worst Q). Click a row for details."));
    var layout = h("div", "trees-layout"), list = h("div", "tree-list");
    detail = add(h("aside", "detail"), h("div", "dim", "Click a node to see its action, observation and siblings."));
    add(layout, list, detail);
    add(panel, bar, layout);

    D.trees.forEach(function (t, ti) {
      prepTree(t);
      var s = t.summary;
      var sec = h("section", "tree");
      sec.setAttribute("data-tree", ti);
      sec.setAttribute("data-nodes", t.nodes.length);
      var head = add(h("div", "head"), h("span", "title", t.task), multiTreeFile ? chip(t.file) : null,
        chip(t.env + " / " + t.split), t.task_type ? chip(t.task_type) : null,
        chip(plural(s.nodes, "node")), chip(s.branches + (s.branches === 1 ? " branch" : " branches")), chip(plural(s.contrast_pairs, "contrast pair"),
          s.contrast_pairs ? "warn" : ""), chip(plural(s.env_steps, "env step")), chip(plural(s.tokens, "token")),
        chip("depth " + s.max_depth), chip("best reward " + num(s.best_reward, 2), s.best_reward >= 1 - 1e-9 ? "good" : ""),
        s.pruned ? chip(s.pruned + " pruned", "bad") : null, s.merged ? chip(s.merged + " merged") : null,
        s.stopped_by ? chip("stopped by " + s.stopped_by) : null, s.q_computed ? chip("Q backed up here") : null,
        s.q_missing ? chip("no Q for " + plural(s.q_missing, "node")) : null);
      var body = h("div", "body");
      body.hidden = true;
      add(sec, head, body);
      list.appendChild(sec);
      t._sec = sec; t._body = body;
      head.addEventListener("click", function () { setTreeOpen(t, body.hidden); });
    });

    function setTreeOpen(t, open) {
      if (open && !t._outline) buildTreeBody(t);
      t._body.hidden = !open;
    }
    function buildTreeBody(t) {
      var tools = h("div", "legend");
      var ex = h("button", "small", "expand all"), col = h("button", "small", "collapse"), best = h("button", "small", "best leaf");
      add(tools, ex, " ", col, " ", best, " ", t.nodes.length + " nodes; collapsed rows show how many nodes they hide");
      t._outline = h("div", "outline");
      add(t._body, tools, t._outline);
      ex.addEventListener("click", function () { expandAll(t); drawOutline(t); });
      col.addEventListener("click", function () { openBudget(t, 1); drawOutline(t); });
      best.addEventListener("click", function () {
        var b = 0;
        t.nodes.forEach(function (n) { if (n.reward > t.nodes[b].reward) b = n.id; });
        revealNode(t, b);
      });
      t._outline.addEventListener("click", function (ev) {
        var row = ev.target.closest(".row");
        if (!row) return;
        var id = Number(row.parentNode.getAttribute("data-id"));
        if (ev.target.classList.contains("tog")) toggleNode(t, id); else showNode(t, id);
      });
      if (EXPAND_ALL) expandAll(t); else openBudget(t, INITIAL_VISIBLE);
      drawOutline(t);
    }

    filter.addEventListener("input", function () {
      var f = filter.value.toLowerCase();
      D.trees.forEach(function (t) { t._sec.hidden = f && t.task.toLowerCase().indexOf(f) < 0; });
    });
    openAll.addEventListener("click", function () { D.trees.forEach(function (t) { setTreeOpen(t, true); }); });
    closeAll.addEventListener("click", function () { D.trees.forEach(function (t) { setTreeOpen(t, false); }); });

    if (OPT.bench) bench(Math.min(100, Math.max(1, Number(OPT.bench) || 1)));  // a typo must not hang the tab
    D.trees.forEach(function (t, ti) { if (EXPAND_ALL || ti === 0) setTreeOpen(t, true); });
    var at = /^(\d+):(\d+)$/.exec(OPT.node || "");
    if (at && D.trees[+at[1]] && D.trees[+at[1]].nodes[+at[2]]) {
      var tt = D.trees[+at[1]];
      setTreeOpen(tt, true);
      revealNode(tt, +at[2]);
    }

    function bench(reps) {
      D.trees.forEach(function (t) { setTreeOpen(t, true); });
      function timed(t, full) {
        t._outline.textContent = "";
        void t._outline.offsetHeight;
        var t0 = performance.now();
        if (full) expandAll(t); else openBudget(t, INITIAL_VISIBLE);
        drawOutline(t);
        return performance.now() - t0;
      }
      D.trees.forEach(function (t) { timed(t, true); timed(t, false); });  // warm up
      D.trees.forEach(function (t) {
        var init = Infinity, full = Infinity;
        for (var r = 0; r < reps; r++) {
          init = Math.min(init, timed(t, false));
          full = Math.min(full, timed(t, true));
        }
        t._sec.setAttribute("data-ms-initial", init.toFixed(3));
        t._sec.setAttribute("data-ms-full", full.toFixed(3));
        if (EXPAND_ALL) expandAll(t); else openBudget(t, INITIAL_VISIBLE);
        drawOutline(t);
        t._sec.setAttribute("data-visible", t._outline.querySelectorAll(".node").length);
      });
      document.body.setAttribute("data-bench", "done");
    }
  }

  // -- task cards (episodes and decision files) --------------------------------------------------
  function groupBy(items, key) {
    var order = [], groups = Object.create(null);
    items.forEach(function (it) {
      var k = key(it);
      if (!(k in groups)) { groups[k] = []; order.push(k); }
      groups[k].push(it);
    });
    return order.map(function (k) { return [k, groups[k]]; });
  }
  function taskCard(title, chips, build, open) {
    var sec = h("section", "task-card");
    var head = add(h("div", "head"), h("span", "title", title));
    chips.forEach(function (c) { if (c) head.appendChild(c); });
    var body = h("div", "body");
    body.hidden = true;
    var built = false;
    function setOpen(o) {
      if (o && !built) { build(body); built = true; }
      body.hidden = !o;
    }
    head.addEventListener("click", function () { setOpen(body.hidden); });
    add(sec, head, body);
    if (open) setOpen(true);
    return sec;
  }
  function outcomeOf(r, success) {
    if (success) return "success";
    return isNum(r) && r > 0 ? "partial" : "failure";
  }
  function selectOf(label, values) {
    var sel = h("select");
    option(sel, "", "all");
    values.forEach(function (v) { option(sel, v, v); });
    return [add(h("label"), label + " ", sel), sel];
  }
  function uniq(xs) {
    var s = Object.create(null);
    return xs.filter(function (x) { if (s[x]) return false; s[x] = 1; return true; });
  }

  // -- episodes ---------------------------------------------------------------------------------
  function methodKey(e) { return multiSource ? e.method + " · " + e.source : e.method; }
  var multiSource = uniq(D.episodes.map(function (e) { return e.source; })).length > 1;
  // trees and decision cards of two files can look alike: their file is shown when several were read
  var multiTreeFile = uniq(D.trees.map(function (t) { return t.file; })).length > 1;
  var multiDecisionFile = uniq(D.decisions.map(function (d) { return d.source; })).length > 1;

  function renderEpisodes(panel) {
    var methods = uniq(D.episodes.map(methodKey));
    var splits = uniq(D.episodes.map(function (e) { return e.split; }));
    var bar = h("div", "toolbar"), boxes = Object.create(null);
    var chosen = defaultMethods(methods);
    var mlab = add(h("span"), "methods: ");
    methods.forEach(function (m) {
      var cb = h("input");
      cb.type = "checkbox"; cb.checked = EXPAND_ALL || chosen.indexOf(m) >= 0; cb.value = m;
      boxes[m] = cb;
      add(mlab, add(h("label"), cb, m), " ");
    });
    var sp = selectOf("split", splits), oc = selectOf("outcome", ["success", "partial", "failure"]);
    var filter = h("input");
    filter.type = "text"; filter.placeholder = "filter tasks";
    add(bar, mlab, sp[0], oc[0], add(h("label"), "task ", filter),
      h("span", "legend", "Checked methods are shown side by side per task; orange boxes are the QNet's decisions (the chosen candidate highlighted)."));
    var list = h("div", "cards");
    add(panel, bar, list);

    function draw() {
      list.textContent = "";
      var shown = methods.filter(function (m) { return boxes[m].checked; });
      var f = filter.value.toLowerCase(), opened = 0;
      var groups = groupBy(D.episodes, function (e) { return e.env + "\u0000" + e.split + "\u0000" + e.task; });
      groups.forEach(function (g) {
        var eps = g[1], e0 = eps[0];
        if (sp[1].value && e0.split !== sp[1].value) return;
        if (f && e0.task.toLowerCase().indexOf(f) < 0) return;
        var cols = shown.map(function (m) {
          return eps.filter(function (e) { return methodKey(e) === m; })[0];
        }).filter(function (e) { return e && (!oc[1].value || outcomeOf(e.reward, e.success) === oc[1].value); });
        if (!cols.length) return;
        var chips = [chip(e0.env + " / " + e0.split), e0.task_type ? chip(e0.task_type) : null];
        eps.forEach(function (e) {
          chips.push(chip(methodKey(e) + " " + num(e.reward, 2), e.success ? "good" : (e.reward > 0 ? "warn" : "")));
        });
        var open = EXPAND_ALL || opened < INITIAL_CARDS;
        opened += 1;
        list.appendChild(taskCard(e0.task, chips, function (body) {
          var grid = h("div", "sbs");
          cols.forEach(function (e) { grid.appendChild(episodeEl(e)); });
          body.appendChild(grid);
        }, open));
      });
      if (!list.firstChild) list.appendChild(h("p", "empty", "No episode matches these filters."));
    }
    methods.forEach(function (m) { boxes[m].addEventListener("change", draw); });
    sp[1].addEventListener("change", draw);
    oc[1].addEventListener("change", draw);
    filter.addEventListener("input", draw);
    draw();
  }

  function defaultMethods(methods) {
    // greedy beside the first qlass method that made QNet decisions (the paper's Fig. 5), else the first two.
    var out = [];
    var g = methods.filter(function (m) { return /^greedy/.test(m); })[0];
    if (g) out.push(g);
    var q = D.episodes.filter(function (e) { return e.method_name === "qlass" && e.decisions.length && !e.oracle; })[0];
    if (q && out.indexOf(methodKey(q)) < 0) out.push(methodKey(q));
    methods.forEach(function (m) { if (out.length < 2 && out.indexOf(m) < 0) out.push(m); });
    return out;
  }

  function episodeEl(e) {
    var box = h("div", "episode");
    box.setAttribute("data-method", e.method);
    add(box, h("div", "ep-head", methodKey(e)));
    var chips = add(h("div"), rewardChip(e.reward, e.success), chip(e.success ? "success" : "no success", e.success ? "good" : ""),
      chip(plural(e.steps.length, "turn")), chip(int(e.completion_tokens) + " completion tok"),
      e.qnet_tokens ? chip(int(e.qnet_tokens) + " QNet tok") : null, chip(int(e.env_steps) + " env steps"),
      e.oracle ? chip("oracle", "warn") : null);
    box.appendChild(chips);
    var first = add(h("details"), h("summary", "", "task and first observation"), pre(e.first_observation));
    box.appendChild(first);
    if (e.candidates && e.candidates.length) {
      var best = -1;  // search's argmax: the first highest score (a candidate that never stepped scores -inf)
      e.candidates.forEach(function (c, i) { if (isNum(c.score) && (best < 0 || c.score > e.candidates[best].score)) best = i; });
      if (best < 0) best = 0;
      add(box, h("div", "dim", "best-of-n trajectories (the highest score is returned)"),
        table(["#", "score", "reward", "completion tok"], e.candidates.map(function (c, i) {
          return [String(i), N(c.score === null ? "−inf" : num(c.score)), N(num(c.reward, 2)), N(int(c.completion_tokens))];
        }), function (i) { return i === best ? "chosen" : ""; }));
    }
    var byStep = Object.create(null);
    e.decisions.forEach(function (d) { (byStep[d.step] = byStep[d.step] || []).push(d); });
    var ol = h("ol", "turns"), prev = 0;
    e.steps.forEach(function (s, t) {
      var li = h("li", "turn");
      (byStep[t] || []).forEach(function (d) { li.appendChild(decisionEl(d)); });
      delete byStep[t];
      var act = s.action === null || s.action === undefined ? actionOf(s.output) : s.action;
      add(li, add(h("div"), h("span", "t", "t" + t), h("span", "act", act === null ? "(no action)" : act)));
      var th = thoughtOf(s.output);
      if (th) li.appendChild(h("div", "thought", th));
      li.appendChild(pre(s.observation, "obs"));
      var up = isNum(s.reward) && s.reward > prev + 1e-9;
      add(li, h("div", "rew" + (up ? " up" : ""), "reward " + num(s.reward, 2) + (up ? " (+" + num(s.reward - prev, 2) + ")" : "") +
        (s.done ? " · episode ended" : "")));
      if (isNum(s.reward)) prev = s.reward;
      ol.appendChild(li);
    });
    box.appendChild(ol);
    Object.keys(byStep).forEach(function (k) { byStep[k].forEach(function (d) { box.appendChild(decisionEl(d)); }); });
    return box;
  }

  function decisionEl(d) {
    var box = h("div", "decision qnet-decision");
    box.setAttribute("data-step", d.step);
    var hasScores = d.scores && d.scores.length;
    var best = -Infinity;
    (hasScores ? d.scores : d.values).forEach(function (v) { if (isNum(v)) best = Math.max(best, v); });
    add(box, h("div", "cap", "QNet decision at t" + d.step + ": " + d.actions.length + " candidates"));
    var head = ["", "action", "value"].concat(hasScores ? ["score"] : []);
    box.appendChild(table(head, d.actions.map(function (a, i) {
      var row = [i === d.chosen ? "▶ chosen" : "", a, N(num(d.values[i]), "val")];
      if (hasScores) row.push(N(num(d.scores[i])));
      return row;
    }), function (i) {
      var v = hasScores ? d.scores[i] : d.values[i];
      return (i === d.chosen ? "chosen" : "") + (isNum(v) && Math.abs(v - best) <= 1e-12 ? " best" : "");
    }));
    return box;
  }

  // -- decision files ---------------------------------------------------------------------------
  function renderDecisionFile(panel) {
    var splits = uniq(D.decisions.map(function (d) { return d.split; }));
    var bar = h("div", "toolbar");
    var sp = selectOf("split", splits);
    var miss = h("input");
    miss.type = "checkbox";
    var filter = h("input");
    filter.type = "text"; filter.placeholder = "filter tasks";
    add(bar, sp[0], add(h("label"), "task ", filter), add(h("label"), miss, "only where the played candidate is not a best one"),
      h("span", "legend", "Candidates' values are the mean of their rollouts' final rewards; the played one is highlighted."));
    var list = h("div", "cards");
    add(panel, bar, list);

    function playedIsBest(d) {
      var best = Math.max.apply(null, d.candidates.map(function (c) { return isNum(c.mean) ? c.mean : -Infinity; }));
      return d.played !== null && d.played !== undefined && d.candidates[d.played] &&
        Math.abs(d.candidates[d.played].mean - best) <= 1e-9;
    }
    function draw() {
      list.textContent = "";
      var f = filter.value.toLowerCase(), opened = 0;
      groupBy(D.decisions, function (d) { return d.source + "\u0000" + d.split + "\u0000" + d.task; }).forEach(function (g) {
        var ds = g[1].filter(function (d) { return !miss.checked || !playedIsBest(d); }), d0 = g[1][0];
        if (!ds.length || (sp[1].value && d0.split !== sp[1].value)) return;
        if (f && d0.task.toLowerCase().indexOf(f) < 0) return;
        var open = EXPAND_ALL || opened < INITIAL_CARDS;
        opened += 1;
        var chips = [multiDecisionFile ? chip(d0.source) : null, chip(d0.env + " / " + d0.split), chip(plural(ds.length, "decision"))];
        list.appendChild(taskCard(d0.task, chips, function (body) {
          ds.forEach(function (d) { body.appendChild(benchDecisionEl(d)); });
        }, open));
      });
      if (!list.firstChild) list.appendChild(h("p", "empty", "No decision matches these filters."));
    }
    sp[1].addEventListener("change", draw);
    miss.addEventListener("change", draw);
    filter.addEventListener("input", draw);
    draw();
  }

  function benchDecisionEl(d) {
    var box = h("div", "decision bench-decision");
    box.setAttribute("data-step", d.step);
    var best = Math.max.apply(null, d.candidates.map(function (c) { return isNum(c.mean) ? c.mean : -Infinity; }));
    add(box, h("div", "cap", "t" + d.step + ": " + d.candidates.length + " candidates" +
      (isNum(d.samples) ? " from " + d.samples + " samples" : "") + (d.truncated ? " (" + d.truncated + " truncated)" : "") +
      (d.played === null && d.has_played ? " · played output not among them" : "")));
    add(box, add(h("details"), h("summary", "", "state (latest observation)"), pre(d.state)));
    box.appendChild(table(["", "action", "value (mean ± std)", "rollout rewards", "step reward", "mean logprob", "marks"],
      d.candidates.map(function (c, i) {
        var marks = [c.anchor ? "greedy anchor" : "", c.terminal ? "ends episode" : "", c.count > 1 ? "×" + c.count : ""]
          .filter(Boolean).join(", ");
        return [i === d.played ? "▶ played" : "", c.action === null ? "(no action) " + oneLine(c.output, 60) : c.action,
          N(num(c.mean) + " ± " + num(c.std), "val"), (c.rollout_rewards || []).map(function (r) { return num(r, 2); }).join(" "),
          N(num(c.reward, 2)), N(num(c.mean_logprob)), marks];
      }), function (i) {
        var c = d.candidates[i];
        return (i === d.played ? "chosen" : "") + (isNum(c.mean) && Math.abs(c.mean - best) <= 1e-9 ? " best" : "");
      }));
    return box;
  }

  // -- results ----------------------------------------------------------------------------------
  function renderResults(panel) {
    D.results.forEach(function (res) {
      var sec = add(h("div", "result-set"), h("h2", "", res.name));
      if (res.rows.length) {
        add(sec, h("div", "dim", "Results (reward and success in %, tokens per task; [oracle] rows read the environment's reward)"),
          table(["env", "split", "method", "tasks", "avg reward", "success %", "completion tok", "prompt tok", "QNet tok",
            "choices", "env steps", "wall s"], res.rows.map(function (r) {
            return [r.env, r.split, r.method, N(r.tasks), N(pct(r.avg_reward)), N(pct(r.success_rate)), N(int(r.completion_tokens)),
              N(int(r.prompt_tokens)), N(int(r.qnet_tokens)), N(isNum(r.qnet_choices) ? num(r.qnet_choices, 1) : "–"),
              N(num(r.env_steps, 1)), N(num(r.wall_time, 1))];
          }), function (i) { return res.rows[i].oracle ? "oracle" : ""; }));
      }
      if (res.paired.length) {
        // the interval's level as the report recorded it (files made before it was recorded: 95%)
        var level = function (r) { return String(Math.round(1000 * (isNum(r.confidence) ? r.confidence : 0.95)) / 10) + "%"; };
        var oneLevel = res.paired.every(function (r) { return level(r) === level(res.paired[0]); });
        add(sec, h("div", "dim", "Paired differences: per task, the method's reward minus the baseline's, averaged (reward points); bootstrap " +
          (oneLevel ? level(res.paired[0]) + " " : "") + "interval"),
          table(["env", "split", "method", "vs", "tasks", "Δ avg reward", oneLevel ? level(res.paired[0]) + " CI" : "CI (level)",
            "wins / ties / losses"], res.paired.map(function (r) {
            var sig = r.ci_low > 0 ? "good" : (r.ci_high < 0 ? "bad" : "");
            return [r.env, r.split, r.method, r.baseline, N(r.tasks), N((r.mean_diff >= 0 ? "+" : "") + pct(r.mean_diff), sig),
              N((isNum(r.ci_low) ? "[" + pct(r.ci_low) + ", " + pct(r.ci_high) + "]" : "–") + (oneLevel ? "" : " (" + level(r) + ")")),
              N(r.wins + " / " + r.ties + " / " + r.losses)];
          })));
      }
      if (res.markdown) add(sec, h("div", "dim", "results.md"), pre(res.markdown));
      if (res.budget.length) {
        add(sec, h("div", "dim", "Budget curve: average reward against completion tokens per task (labels: N or M)"));
        var charts = h("div", "charts");
        groupBy(res.budget, function (p) { return p.env + " / " + p.split; }).forEach(function (g) {
          charts.appendChild(budgetChart(g[0], g[1]));
        });
        sec.appendChild(charts);
        sec.appendChild(table(["env", "split", "curve", "N or M", "completion tok", "avg reward"], res.budget.map(function (p) {
          return [p.env, p.split, p.curve, N(p.budget_param), N(int(p.completion_tokens)), N(pct(p.avg_reward))];
        })));
      }
      if (!res.rows.length && !res.markdown && !res.budget.length) sec.appendChild(h("p", "empty", "No results in this folder."));
      panel.appendChild(sec);
    });
  }

  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = String(text);
    return e;
  }

  function niceStep(raw) {
    // 1, 2, 2.5 or 5 times a power of ten, at least raw
    var p = Math.pow(10, Math.floor(Math.log10(raw))), steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= raw) return steps[i] * p;
    return 10 * p;
  }

  function budgetChart(title, points) {
    var W = 460, H = 300, L = 52, R = 130, T = 24, B = 40;
    var COLORS = ["#2f5fb3", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#c2255c"];
    var xs = points.map(function (p) { return p.completion_tokens; }), ys = points.map(function (p) { return 100 * p.avg_reward; });
    var xstep = niceStep(Math.max.apply(null, xs.concat([1])) * 1.05 / 4), ystep = niceStep(Math.max(10, Math.max.apply(null, ys.concat([0])) * 1.1) / 4);
    var xmax = 4 * xstep, ymax = 4 * ystep;
    function X(v) { return L + (W - L - R) * v / xmax; }
    function Y(v) { return H - B - (H - T - B) * v / ymax; }
    var s = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img" });
    s.appendChild(svg("text", { x: L, y: 15, "font-weight": "bold" }, title));
    s.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#888" }));
    s.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#888" }));
    for (var i = 0; i <= 4; i++) {
      var yv = ymax * i / 4, xv = xmax * i / 4;
      s.appendChild(svg("line", { x1: L, y1: Y(yv), x2: W - R, y2: Y(yv), stroke: "#eee" }));
      s.appendChild(svg("text", { x: L - 6, y: Y(yv) + 4, "text-anchor": "end" }, +yv.toPrecision(6)));
      s.appendChild(svg("text", { x: X(xv), y: H - B + 14, "text-anchor": "middle" }, int(xv)));
    }
    s.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, "completion tokens per task"));
    s.appendChild(svg("text", { x: 12, y: (T + H - B) / 2, transform: "rotate(-90 12 " + (T + H - B) / 2 + ")", "text-anchor": "middle" }, "avg reward (%)"));
    groupBy(points, function (p) { return p.curve; }).forEach(function (g, ci) {
      var color = COLORS[ci % COLORS.length];
      var pts = g[1].slice().sort(function (a, b) { return a.completion_tokens - b.completion_tokens; });
      s.appendChild(svg("polyline", { fill: "none", stroke: color, "stroke-width": 2,
        points: pts.map(function (p) { return X(p.completion_tokens) + "," + Y(100 * p.avg_reward); }).join(" ") }));
      pts.forEach(function (p) {
        var c = svg("circle", { cx: X(p.completion_tokens), cy: Y(100 * p.avg_reward), r: 4, fill: color });
        c.appendChild(svg("title", {}, g[0] + " " + p.budget_param + ": " + pct(p.avg_reward) + " at " + int(p.completion_tokens) + " tokens"));
        s.appendChild(c);
        s.appendChild(svg("text", { x: X(p.completion_tokens) + 5, y: Y(100 * p.avg_reward) - 5 }, p.budget_param));
      });
      s.appendChild(svg("rect", { x: W - R + 10, y: T + 16 * ci, width: 10, height: 10, fill: color }));
      s.appendChild(svg("text", { x: W - R + 24, y: T + 16 * ci + 9 }, g[0]));
    });
    return add(h("div", "chart"), s);
  }

  // -- page frame -------------------------------------------------------------------------------
  var app = document.getElementById("app");
  var header = add(h("header", "top"), h("h1", "", D.title || "qlass view"));
  var counts = [];
  if (D.trees.length) counts.push(plural(D.trees.length, "tree"));
  if (D.episodes.length) counts.push(plural(D.episodes.length, "episode"));
  if (D.decisions.length) counts.push(plural(D.decisions.length, "decision state"));
  if (D.results.length) counts.push(plural(D.results.length, "result set"));
  add(header, h("div", "meta", D.source + " · " + counts.join(" · ") + (D.files.length ? " · read: " + D.files.join(", ") : "")));
  var nav = h("nav", "tabs");
  header.appendChild(nav);
  var main = h("main");
  add(app, header, main);

  var TABS = [];
  if (D.trees.length) TABS.push(["trees", "Trees", renderTrees]);
  if (D.episodes.length) TABS.push(["episodes", "Episodes", renderEpisodes]);
  if (D.decisions.length) TABS.push(["decisions", "Decisions", renderDecisionFile]);
  if (D.results.length) TABS.push(["results", "Results", renderResults]);
  var panels = {}, buttons = {};
  function show(name) {
    Object.keys(panels).forEach(function (k) {
      panels[k].classList.toggle("active", k === name);
      buttons[k].classList.toggle("active", k === name);
    });
    document.body.setAttribute("data-tab", name);
  }
  TABS.forEach(function (tab) {
    var b = h("button", "", tab[1]);
    b.type = "button";
    b.addEventListener("click", function () { show(tab[0]); });
    nav.appendChild(b);
    buttons[tab[0]] = b;
    var p = h("section", "panel");
    p.id = "panel-" + tab[0];
    main.appendChild(p);
    panels[tab[0]] = p;
  });

  var first = TABS.length ? TABS[0][0] : null;
  if (OPT.bench && panels.trees) first = "trees";
  else if (OPT.tab && has(panels, OPT.tab)) first = OPT.tab;
  if (first) show(first);
  TABS.forEach(function (tab) { tab[2](panels[tab[0]]); });
  document.body.setAttribute("data-ready", "1");
})();
