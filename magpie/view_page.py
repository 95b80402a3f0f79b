"""The static parts of the `magpie view` page: markup, style and script (our own, no libraries).

The script never puts data into `innerHTML`: every string from the dataset reaches the page
through `textContent`, `createTextNode` or an `<option>`'s text, and the optional Markdown view
builds elements (paragraphs, headings, lists, code) around text nodes, with no links or images.
"""

from __future__ import annotations

PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <div id="controls">
    <input id="search" type="search" placeholder="Search the text of every row" size="40">
    <span id="filters"></span>
    <label><input id="markdown" type="checkbox"> Markdown</label>
  </div>
  <div id="pager">
    <button id="prev" type="button">&larr; prev</button>
    <span id="page"></span>
    <button id="next" type="button">next &rarr;</button>
    <span id="status"></span>
  </div>
</header>
<main id="rows"></main>
{header}<script>{script}</script>
{blocks}<div id="magpie-end"></div>
</body>
</html>
"""

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d1f23; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #d5d8dd;
  padding: 8px 16px; z-index: 1; }
h1 { font-size: 18px; margin: 0 0 6px; }
#controls, #pager { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin: 4px 0; }
#filters label { margin-right: 8px; }
select { max-width: 220px; }
#status { color: #555; }
main { padding: 12px 16px; }
.row { background: #fff; border: 1px solid #d5d8dd; border-radius: 6px; padding: 10px 12px;
  margin-bottom: 12px; }
.meta { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; font-size: 12px; }
.uuid { color: #777; font-family: monospace; }
.badge { background: #e8eefc; color: #23408e; border-radius: 10px; padding: 1px 8px; }
.badge.score { background: #e9f6ec; color: #1f6b33; }
h3 { font-size: 13px; margin: 8px 0 4px; color: #444; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; background: #fafbfc;
  border: 1px solid #eceef1; border-radius: 4px; padding: 6px 8px; max-height: 420px;
  overflow: auto; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
.turn { margin: 4px 0; }
.role { font-weight: 600; font-size: 12px; color: #555; }
.md p { white-space: pre-wrap; margin: 0 0 6px; }
.md pre { background: #272b33; color: #eef; padding: 6px; overflow: auto; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  const PAGE = 20;
  const H = JSON.parse(document.getElementById("magpie-header").textContent);
  const TAGS = Object.keys(H.tags);
  const cols = {};        // column name -> array over every loaded row
  let loaded = 0, blocksRead = 0, visible = new Int32Array(0), page = 0, query = "";
  const filters = {};     // tag column -> selected code, or null for all

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function readBlock() {
    const node = document.getElementById("magpie-rows-" + blocksRead);
    const block = JSON.parse(node.textContent);
    node.textContent = "";  // the parsed copy is enough
    let n = 0;
    for (const [name, values] of Object.entries(block)) {
      if (values === null) continue;
      const all = cols[name] || (cols[name] = []);
      for (let i = 0; i < values.length; i++) all.push(values[i]);
      n = values.length;
    }
    loaded += n;
    blocksRead += 1;
  }

  function inline(parent, text) {
    const re = /(`[^`\n]+`|\*\*[^*\n]+\*\*)/g;
    let last = 0, m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      const tok = m[0];
      parent.appendChild(tok[0] === "`" ? el("code", null, tok.slice(1, -1))
                                        : el("strong", null, tok.slice(2, -2)));
      last = m.index + tok.length;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  function markdown(src) {
    const root = el("div", "text md");
    const lines = String(src).split("\n");
    let para = [], list = null;
    const flush = () => {
      if (para.length) { const p = el("p"); inline(p, para.join("\n")); root.appendChild(p); }
      para = [];
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(```+|~~~+)/);
      if (fence) {
        flush(); list = null;
        const code = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) {
          code.push(lines[i]);
        }
        const pre = el("pre");
        pre.appendChild(el("code", null, code.join("\n")));
        root.appendChild(pre);
        continue;
      }
      const h = line.match(/^(#{1,6})\s+(.*)$/);
      if (h) {
        flush(); list = null;
        const e = el("h4"); inline(e, h[2]); root.appendChild(e);
        continue;
      }
      const li = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
      if (li) {
        flush();
        const tag = /\d/.test(li[1]) ? "OL" : "UL";
        if (!list || list.tagName !== tag) { list = el(tag.toLowerCase()); root.appendChild(list); }
        const item = el("li"); inline(item, li[2]); list.appendChild(item);
        continue;
      }
      if (!line.trim()) { flush(); list = null; continue; }
      list = null;
      para.push(line);
    }
    flush();
    return root;
  }

  function textBlock(value) {
    if (value === null || value === undefined) return el("div", "text", "(none)");
    return document.getElementById("markdown").checked ? markdown(value) : el("div", "text", value);
  }

  function num(name, i) {
    const v = cols[name] ? cols[name][i] : null;
    return v === null || v === undefined ? "-" : String(v);
  }

  function conversation(parent, turns) {
    for (const [role, text] of turns || []) {
      const t = el("div", "turn");
      t.appendChild(el("div", "role", role));
      t.appendChild(textBlock(text));
      parent.appendChild(t);
    }
  }

  function side(title, text) {
    const box = el("section");
    box.appendChild(el("h3", null, title));
    box.appendChild(textBlock(text));
    return box;
  }

  function rowElement(i) {
    const row = el("article", "row");
    row.dataset.index = String(i);
    const meta = el("div", "meta");
    meta.appendChild(el("span", "uuid", "#" + (i + 1) + (cols.uuid ? " " + cols.uuid[i] : "")));
    for (const name of TAGS) {
      const code = cols["tag:" + name][i];
      if (code >= 0) meta.appendChild(el("span", "badge", name + ": " + H.tags[name][code]));
    }
    if (cols.instruct_reward) {
      meta.appendChild(el("span", "badge score", "instruct_reward " + num("instruct_reward", i)));
    }
    row.appendChild(meta);
    row.appendChild(el("h3", null, "Instruction"));
    row.appendChild(textBlock(cols.instruction[i]));
    if (H.kind === "dpo") {
      if (cols.context && cols.context[i]) conversation(row, cols.context[i]);
      const pair = el("div", "pair");
      pair.appendChild(side("Chosen (reward " + num("chosen_reward", i) + ")", cols.chosen[i]));
      const worse = "Rejected (reward " + num("rejected_reward", i) + ")";
      pair.appendChild(side(worse, cols.rejected[i]));
      row.appendChild(pair);
      row.appendChild(el("div", "meta", "margin " + num("reward_margin", i)));
    } else if (cols.response) {
      row.appendChild(side("Response", cols.response[i]));
    } else if (cols.conversation) {
      row.appendChild(el("h3", null, "Conversation"));
      conversation(row, cols.conversation[i]);
    } else if (cols.responses) {
      const rewards = cols.rewards ? cols.rewards[i] : [];
      (cols.responses[i] || []).forEach((text, k) => {
        const score = rewards ? rewards[k] : null;
        const r = score !== undefined && score !== null ? " (reward " + score + ")" : "";
        row.appendChild(side("Response " + (k + 1) + r, text));
      });
    }
    return row;
  }

  function render() {
    const pages = Math.max(1, Math.ceil(visible.length / PAGE));
    page = Math.min(Math.max(page, 0), pages - 1);
    const start = page * PAGE, end = Math.min(visible.length, start + PAGE);
    const frag = document.createDocumentFragment();
    for (let j = start; j < end; j++) frag.appendChild(rowElement(visible[j]));
    document.getElementById("rows").replaceChildren(frag);
    document.getElementById("page").textContent = "page " + (page + 1) + " / " + pages;
    let status = "no rows match";
    if (visible.length) status = "rows " + (start + 1) + "-" + end + " of " + visible.length;
    if (visible.length < loaded) status += " (filtered from " + loaded + ")";
    if (loaded < H.rows) status += " - loading " + loaded + " / " + H.rows;
    document.getElementById("status").textContent = status;
    document.body.dataset.visible = String(visible.length);
    document.body.dataset.shown = String(end - start);
  }

  function searchable(i) {
    const out = [cols.instruction[i]];
    for (const name of ["chosen", "rejected", "response"]) if (cols[name]) out.push(cols[name][i]);
    for (const name of ["context", "conversation"]) {
      if (cols[name] && cols[name][i]) for (const t of cols[name][i]) out.push(t[1]);
    }
    if (cols.responses && cols.responses[i]) for (const t of cols.responses[i]) out.push(t);
    return out;
  }

  function matcher() {
    const active = TAGS.filter((n) => filters[n] !== null && filters[n] !== undefined);
    const re = query ? new RegExp(query.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"), "i") : null;
    return (i) => {
      for (const n of active) if (cols["tag:" + n][i] !== filters[n]) return false;
      return !re || searchable(i).some((s) => s !== null && s !== undefined && re.test(s));
    };
  }

  function matching(from, to) {
    const test = matcher();
    const out = new Int32Array(to - from);
    let k = 0;
    for (let i = from; i < to; i++) if (test(i)) out[k++] = i;
    return out.subarray(0, k);
  }

  function update(keepPage) {  // filters or search changed: every loaded row again
    visible = matching(0, loaded);
    if (!keepPage) page = 0;
    render();
  }

  function extend(from) {  // rows from..loaded arrived: test only those
    const more = matching(from, loaded);
    const all = new Int32Array(visible.length + more.length);
    all.set(visible);
    all.set(more, visible.length);
    visible = all;
    render();
  }

  function buildFilters() {
    const bar = document.getElementById("filters");
    for (const name of TAGS) {
      const codes = cols["tag:" + name];
      const counts = new Array(H.tags[name].length).fill(0);
      let nulls = 0;
      for (let i = 0; i < codes.length; i++) codes[i] < 0 ? nulls++ : counts[codes[i]]++;
      const label = el("label", null, name + " ");
      const select = el("select");
      select.id = "filter-" + name;
      const option = (value, text) => {
        const o = el("option", null, text);
        o.value = value;
        select.appendChild(o);
      };
      option("", "all");
      counts.map((c, code) => [c, code]).sort((a, b) => b[0] - a[0])
        .forEach(([c, code]) => option(String(code), H.tags[name][code] + " (" + c + ")"));
      if (nulls) option("-1", "(none) (" + nulls + ")");
      select.addEventListener("change", () => {
        filters[name] = select.value === "" ? null : Number(select.value);
        update(false);
      });
      label.appendChild(select);
      bar.appendChild(label);
    }
  }

  // The data blocks come after this script: a block is whole once the parser has made the
  // element after it, so blocks are read while the rest of the page is still arriving.
  function blockReady(k) {
    const node = document.getElementById("magpie-rows-" + k);
    return node !== null && node.nextElementSibling !== null;
  }

  function finish(before) {
    if (TAGS.length) {
      document.getElementById("filters").replaceChildren();
      buildFilters();
      restoreFilters();
    }
    if (before < loaded) extend(before); else render();
    document.body.dataset.loaded = "1";
    document.body.dataset.loadedMs = String(Math.round(performance.now()));
  }

  function pump() {
    const started = performance.now();
    let before = loaded;
    let read = 0;
    while (blocksRead < H.blocks && blockReady(blocksRead) && performance.now() - started < 40) {
      readBlock();
      read += 1;
      if (blocksRead === 1) {
        buildFilters();
        update(false);
        before = loaded;
        document.body.dataset.firstPageMs = String(Math.round(performance.now()));
      }
    }
    if (blocksRead >= H.blocks) { finish(before); return; }
    if (read && before > 0) extend(before);
    setTimeout(pump, read ? 0 : 20);
  }

  function restoreFilters() {
    for (const name of TAGS) {
      const value = filters[name];
      const select = document.getElementById("filter-" + name);
      select.value = value === null || value === undefined ? "" : String(value);
    }
  }

  const title = H.title + " - " + H.rows + " rows (" + H.kind + ")";
  document.getElementById("title").textContent = title;
  let timer = null;
  document.getElementById("search").addEventListener("input", (e) => {
    clearTimeout(timer);
    timer = setTimeout(() => { query = e.target.value; update(false); }, 150);
  });
  document.getElementById("markdown").addEventListener("change", () => render());
  document.getElementById("prev").addEventListener("click", () => { page -= 1; render(); });
  document.getElementById("next").addEventListener("click", () => { page += 1; render(); });
  for (const name of TAGS) cols["tag:" + name] = [];
  cols.instruction = [];
  if (H.blocks === 0) {
    buildFilters();
    document.body.dataset.firstPageMs = String(Math.round(performance.now()));
  }
  pump();
})();
"""
