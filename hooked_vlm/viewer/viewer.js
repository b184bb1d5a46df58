// The viewer page: decodes the inline data, draws each map on the original image, panel by panel.
// Everything it needs is in this file and the JSON beside it: it makes no network request.
(async function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const D = JSON.parse($("hvlm-data").textContent);
  const DTYPES = { uint8: Uint8Array, uint32: Uint32Array, float32: Float32Array };

  // Arrays travel as base64 of zlib-compressed little-endian bytes; the browser inflates them.
  async function decode(a) {
    const text = atob(a.data);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new DTYPES[a.dtype](await new Response(stream).arrayBuffer());
  }

  if (typeof DecompressionStream === "undefined") {
    fail("this browser cannot inflate the page's data (DecompressionStream: Chrome 80+, Firefox 113+, Safari 16.4+)");
    return;
  }
  let lut, lmAtt, lmScale, lmShare, visAtt, visScale, visShare, lensIds, lensProb;
  try {
    [lut, lmAtt, lmScale, lmShare, visAtt, visScale, visShare, lensIds, lensProb] = await Promise.all(
      [D.colormap, D.lm.att, D.lm.scale, D.lm.share, D.vision.att, D.vision.scale, D.vision.share, D.lens.ids, D.lens.prob].map(decode));
  } catch (e) {
    fail("could not decode the page's data: " + e);
    return;
  }
  const image = new Image();
  image.src = D.image.src;
  await image.decode();

  const T = D.tokens, N = T.position.length, Q = D.queries.length, H = D.lm.n_heads;
  const VH = D.vision.heads === "mean" ? 1 : D.vision.heads, C = D.vision.cells.length, CV = D.vision.cells_per_view;
  const cellOf = new Map(D.vision.cells.map((t, i) => [t, i]));  // image token -> grid cell index
  const tokenLabel = (t) => D.labels[T.position[t]];
  const S = D.start, at = (list, value, otherwise) => (value === undefined ? otherwise : list.indexOf(value));
  const state = {
    query: at(D.queries, S.query, Math.max(0, D.queries.filter((p) => p < D.answer_start).length - 1)),  // predicts the answer's first token
    lmLayer: at(D.lm.layers, S.layer, D.lm.layers.length >> 1), lmHead: S.head === undefined ? "mean" : String(S.head),
    visionLayer: at(D.vision.layers, S.vision_layer, D.vision.layers.length - 1), visionHead: "mean", cell: centreCell(),
    lensLayer: at(D.lens.layers, S.lens_layer, D.lens.layers.length - 1), opacity: +$("opacity").value, scale: "linear",
  };

  // ------------------------------------------------------------------ values of each map
  // An attention byte b codes the square root of the weight's share of its row's maximum (page.py)
  const BYTE = Float32Array.from({ length: 256 }, (_, b) => (b / 255) ** 2);
  // the heads a choice covers: "mean" is every stored head (vision heads stored averaged: the one row)
  const headsOf = (choice, n) => (choice === "mean" ? [...Array(n).keys()] : [+choice]);
  const lmRow = (h) => (state.lmLayer * H + h) * Q + state.query;
  const visRow = (h) => (state.visionLayer * VH + h) * C + state.cell;
  function lmValues() {
    const out = new Float32Array(N), heads = headsOf(state.lmHead, H);
    for (const h of heads) {
      const row = lmRow(h), k = lmScale[row] / heads.length;
      for (let t = 0; t < N; t++) out[t] += BYTE[lmAtt[row * N + t]] * k;
    }
    return out;
  }
  function visionValues() {  // NaN outside the query cell's view: the tower sees each view alone
    const out = new Float32Array(N).fill(NaN), first = Math.floor(state.cell / CV) * CV, heads = headsOf(state.visionHead, VH);
    for (let j = 0; j < CV; j++) out[D.vision.cells[first + j]] = 0;
    for (const h of heads) {
      const row = visRow(h), k = visScale[row] / heads.length;
      for (let j = 0; j < CV; j++) out[D.vision.cells[first + j]] += BYTE[visAtt[row * CV + j]] * k;
    }
    return out;
  }
  // the exact share of a row on the image (LM) or on the view's cells (vision), for the text
  const meanOver = (heads, f) => heads.reduce((a, h) => a + f(h), 0) / heads.length;
  const lmShareNow = () => meanOver(headsOf(state.lmHead, H), (h) => lmShare[lmRow(h)]);
  const visShareNow = () => meanOver(headsOf(state.visionHead, VH), (h) => visShare[visRow(h)]);
  function lensTop(t, rank) {
    const i = (state.lensLayer * N + t) * D.lens.k + rank;
    return { text: D.lens.vocab[lensIds[i]], prob: lensProb[i] / 255 };
  }

  // ------------------------------------------------------------------ drawing
  const colour = (f) => {  // f in [0, 1] -> the colour map's entry, as the colour bar shows it
    const i = 3 * Math.round(255 * Math.min(1, Math.max(0, state.scale === "sqrt" ? Math.sqrt(f) : f)));
    return [lut[i], lut[i + 1], lut[i + 2]];
  };
  function makePanels(container, onClick) {
    return D.panels.map((panel) => {
      const [x1, y1, x2, y2] = panel.extent, s = D.panel_px / Math.max(x2 - x1, y2 - y1);
      const figure = document.createElement("figure"), canvas = document.createElement("canvas");
      const ratio = window.devicePixelRatio || 1, w = Math.round((x2 - x1) * s), h = Math.round((y2 - y1) * s);
      canvas.className = "panel";
      canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio);
      canvas.style.width = w + "px"; canvas.style.height = h + "px";
      canvas.dataset.panel = panel.name;
      const caption = document.createElement("figcaption");
      caption.textContent = panel.name;
      figure.append(canvas, caption);
      container.append(figure);
      const p = { panel, canvas, k: canvas.width / (x2 - x1), tokens: T.view.map((v, t) => t).filter((t) => panel.views.includes(T.view[t]) && T.row[t] >= 0) };
      p.px = (x) => Math.round((x - x1) * p.k);
      p.py = (y) => Math.round((y - y1) * p.k);
      const hit = (e) => {
        const r = canvas.getBoundingClientRect(), x = x1 + (e.clientX - r.left) * (x2 - x1) / r.width, y = y1 + (e.clientY - r.top) * (y2 - y1) / r.height;
        return p.tokens.find((t) => { const b = T.box[t]; return x >= b[0] && x < b[2] && y >= b[1] && y < b[3]; });
      };
      canvas.addEventListener("mousemove", (e) => showTip(e, hit(e), p));
      canvas.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
      canvas.addEventListener("click", (e) => { const t = hit(e); if (t !== undefined) onClick(t); });
      return p;
    });
  }
  function drawPanel(p, values, vmax, extra) {
    const ctx = p.canvas.getContext("2d"), [x1, y1, x2, y2] = p.panel.extent;
    ctx.fillStyle = "#9a9a9a";  // padding (LLaVA's pad-to-square): cells there are drawn, the photo is not
    ctx.fillRect(0, 0, p.canvas.width, p.canvas.height);
    ctx.imageSmoothingEnabled = p.k * D.image.width / image.naturalWidth < 1;  // small images stay crisp pixels
    ctx.drawImage(image, p.px(0), p.py(0), p.px(D.image.width) - p.px(0), p.py(D.image.height) - p.py(0));
    ctx.globalAlpha = state.opacity;
    for (const t of p.tokens) {
      if (!Number.isFinite(values[t])) continue;
      const [r, g, b] = colour(vmax > 0 ? values[t] / vmax : 0), box = T.box[t];
      ctx.fillStyle = `rgb(${r},${g},${b})`;  // edges snapped to whole pixels: no seams between cells
      ctx.fillRect(p.px(box[0]), p.py(box[1]), p.px(box[2]) - p.px(box[0]), p.py(box[3]) - p.py(box[1]));
    }
    ctx.globalAlpha = 1;
    if (p.panel.views.length > 1) {  // tiles: outline each so the mosaic reads as its tiles
      ctx.setLineDash([6, 4]); ctx.strokeStyle = "#fff"; ctx.lineWidth = 1;
      for (const v of p.panel.views) {
        const e = D.views[v].extent;
        ctx.strokeRect(p.px(e[0]) + 0.5, p.py(e[1]) + 0.5, p.px(e[2]) - p.px(e[0]) - 1, p.py(e[3]) - p.py(e[1]) - 1);
      }
      ctx.setLineDash([]);
    }
    if (extra) extra(ctx, p);
  }
  function colourBar(container, vmax, label) {
    const bar = document.createElement("div"), canvas = document.createElement("canvas");
    bar.className = "colourbar";
    canvas.width = 256; canvas.height = 12; canvas.style.width = "160px"; canvas.style.height = "12px";
    const ctx = canvas.getContext("2d");
    for (let i = 0; i < 256; i++) { ctx.fillStyle = `rgb(${lut[3 * i]},${lut[3 * i + 1]},${lut[3 * i + 2]})`; ctx.fillRect(i, 0, 1, 12); }
    bar.append("0", canvas, fmt(vmax) + (state.scale === "sqrt" ? " (square-root scale)" : ""), label ? " " + label : "");
    container.append(bar);
  }

  // ------------------------------------------------------------------ sections
  function maxOf(values, tokens) { let m = 0, at = -1; for (const t of tokens) if (values[t] > m) { m = values[t]; at = t; } return [m, at]; }
  const drawn = [...Array(N).keys()].filter((t) => T.row[t] >= 0);
  const sections = {
    lm: { panels: makePanels($("lm-panels"), pickCell), values: lmValues },
    vision: { panels: makePanels($("vision-panels"), pickCell), values: visionValues },
    lens: { panels: makePanels($("lens-panels"), pickCell), values: () => Float32Array.from({ length: N }, (_, t) => lensTop(t, 0).prob) },
  };
  function render() {
    const lm = lmValues(), [lmMax, lmAt] = maxOf(lm, drawn), p = D.queries[state.query];
    const share = lmShareNow();
    sections.lm.panels.forEach((panel) => drawPanel(panel, lm, lmMax));
    replaceBar($("lm-panels"), lmMax, "");
    const next = p + 1 < D.labels.length ? ` (next token ${quote(D.labels[p + 1])})` : "";
    $("lm-info").textContent = `From ${quote(D.labels[p])} at position ${p}${next}, layer ${D.lm.layers[state.lmLayer]}, ` +
      `${state.lmHead === "mean" ? "mean of " + H + " heads" : "head " + state.lmHead}: ${pct(share)} of its attention on the ` +
      `image's ${N} tokens; the most, ${fmt(lmMax)}, on ${lmAt >= 0 ? tokenLabel(lmAt) : "none"}.`;

    const vis = visionValues(), [visMax, visAt] = maxOf(vis, drawn), q = D.vision.cells[state.cell];
    const onCells = visShareNow();
    sections.vision.panels.forEach((panel) => drawPanel(panel, vis, visMax, (ctx, pp) => outline(ctx, pp, q, "#ff2020")));
    replaceBar($("vision-panels"), visMax, "");
    $("vision-info").textContent = `From ${tokenLabel(q)} (view ${D.views[T.view[q]].name}), layer ${D.vision.layers[state.visionLayer]}, ` +
      `${state.visionHead === "mean" ? "mean over heads" : "head " + state.visionHead}: ${pct(onCells)} on the view's cells (the rest on CLS); ` +
      `the most, ${fmt(visMax)}, on ${visAt >= 0 ? tokenLabel(visAt) : "none"}.`;

    const lens = sections.lens.values();
    sections.lens.panels.forEach((panel) => drawPanel(panel, lens, 1, lensText));
    replaceBar($("lens-panels"), 1, "probability of the top token");
    const counts = new Map();
    for (const t of drawn) { const w = lensTop(t, 0).text; counts.set(w, (counts.get(w) || 0) + 1); }
    const common = [...counts].sort((a, b) => b[1] - a[1]).slice(0, 5).map(([w, n]) => `${quote(w)} \u00d7${n}`).join(", ");
    $("lens-info").textContent = `After layer ${D.lens.layers[state.lensLayer]}, the most frequent top predictions: ${common}.`;

    document.querySelectorAll("#tokens .q").forEach((el) => el.classList.toggle("sel", +el.dataset.query === state.query));
    fitFrame();
  }
  function replaceBar(container, vmax, label) { container.querySelectorAll(".colourbar").forEach((b) => b.remove()); colourBar(container, vmax, label); }
  function outline(ctx, p, t, colourName) {
    if (!p.tokens.includes(t)) return;
    const b = T.box[t];
    ctx.strokeStyle = colourName; ctx.lineWidth = 2;
    ctx.strokeRect(p.px(b[0]) + 1, p.py(b[1]) + 1, p.px(b[2]) - p.px(b[0]) - 2, p.py(b[3]) - p.py(b[1]) - 2);
  }
  function lensText(ctx, p) {
    ctx.textAlign = "center"; ctx.textBaseline = "middle"; ctx.lineJoin = "round";
    for (const t of p.tokens) {
      const b = T.box[t], w = p.px(b[2]) - p.px(b[0]), h = p.py(b[3]) - p.py(b[1]);
      const text = lensTop(t, 0).text.trim().slice(0, 8) || "\u2423", size = Math.min(h * 0.45, (w * 1.6) / Math.max(2, text.length));
      if (size < 7) continue;
      ctx.font = `${Math.floor(size)}px sans-serif`;
      ctx.strokeStyle = "rgba(0,0,0,0.8)"; ctx.lineWidth = 3; ctx.fillStyle = "#fff";
      ctx.strokeText(text, p.px(b[0]) + w / 2, p.py(b[1]) + h / 2);
      ctx.fillText(text, p.px(b[0]) + w / 2, p.py(b[1]) + h / 2);
    }
  }
  function showTip(e, t, p) {
    const tip = $("tooltip");
    if (t === undefined) { tip.hidden = true; return; }
    const section = Object.keys(sections).find((k) => sections[k].panels.includes(p));
    let text = tokenLabel(t) + ` (position ${T.position[t]})`;
    if (section === "lens") {
      for (let r = 0; r < D.lens.k; r++) { const top = lensTop(t, r); text += `\n${quote(top.text)}  ${pct(top.prob)}`; }
    } else {
      const v = sections[section].values()[t];
      text += Number.isFinite(v) ? `\nattention ${fmt(v)}` : "\nnot in the query cell's view";
    }
    tip.textContent = text;
    tip.hidden = false;
    tip.style.left = e.clientX + 14 + "px"; tip.style.top = e.clientY + 14 + "px";
  }

  // ------------------------------------------------------------------ controls
  function pickCell(t) { if (cellOf.has(t)) { state.cell = cellOf.get(t); render(); } }
  function centreCell() {  // the centre cell of the last view (LLaVA's grid, InternVL's thumbnail)
    const last = Math.floor((C - 1) / CV) * CV, v = D.views[T.view[D.vision.cells[last]]];
    return last + Math.floor(v.rows / 2) * v.cols + Math.floor(v.cols / 2);
  }
  function options(select, items, selected, onChange) {
    for (const [value, text] of items) select.add(new Option(text, value, false, String(value) === String(selected)));
    select.addEventListener("change", () => { onChange(select.value); render(); });
  }
  const layerItems = (layers) => layers.map((l, i) => [i, String(l)]);
  const headItems = (n) => [["mean", "mean"], ...[...Array(n).keys()].map((h) => [h, String(h)])];
  options($("lm-layer"), layerItems(D.lm.layers), state.lmLayer, (v) => { state.lmLayer = +v; });
  options($("lm-head"), headItems(H), state.lmHead, (v) => { state.lmHead = v; });
  options($("vision-layer"), layerItems(D.vision.layers), state.visionLayer, (v) => { state.visionLayer = +v; });
  options($("vision-head"), VH > 1 ? headItems(VH) : [["mean", "mean (stored so)"]], "mean", (v) => { state.visionHead = v; });
  options($("lens-layer"), layerItems(D.lens.layers), state.lensLayer, (v) => { state.lensLayer = +v; });
  $("opacity").addEventListener("input", (e) => { state.opacity = +e.target.value; render(); });
  $("colour-scale").addEventListener("change", (e) => { state.scale = e.target.value; render(); });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "SELECT" || e.target.tagName === "INPUT") return;
    const step = { ArrowLeft: -1, ArrowRight: 1 }[e.key];
    if (step) { state.query = Math.min(Q - 1, Math.max(0, state.query + step)); render(); e.preventDefault(); }
  });

  function tokenStrip() {
    const strip = $("tokens"), queryOf = new Map(D.queries.map((p, i) => [p, i])), isImage = new Set(T.position);
    for (let p = 0; p < D.labels.length; p++) {
      if (p === D.answer_start) strip.append(span("answer \u25b8", "divider"));
      if (isImage.has(p)) {
        if (!isImage.has(p - 1)) {
          let n = 0; while (isImage.has(p + n)) n++;
          strip.append(span(`[${n} image tokens]`, "image"));
        }
        continue;
      }
      const el = span(visible(D.labels[p]), queryOf.has(p) ? "q" : "ctx");
      if (p >= D.answer_start) el.classList.add("answer");
      el.dataset.position = p;
      el.title = `position ${p}`;
      if (queryOf.has(p)) {
        el.dataset.query = queryOf.get(p);
        el.addEventListener("click", () => { state.query = queryOf.get(p); render(); });
      }
      strip.append(el);
    }
  }
  function span(text, cls) { const el = document.createElement("span"); el.textContent = text; el.className = cls; return el; }
  const visible = (s) => s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5") || "\u2205";
  const quote = (s) => "\u201c" + visible(s) + "\u201d";
  const pct = (x) => (100 * x).toFixed(1) + "%";
  function fmt(x) { return x >= 0.01 || x === 0 ? x.toFixed(3) : x.toExponential(2); }
  function fitFrame() {  // in a notebook the page lives in an iframe: fit it to the content (not to the
    // document's scrollHeight, which is at least the frame's own height and would only ever grow)
    const height = Math.ceil(document.body.getBoundingClientRect().bottom + window.scrollY) + 16;
    try { if (window.frameElement) window.frameElement.style.height = height + "px"; } catch (e) { /* cross-origin host */ }
  }
  function fail(message) {
    const p = document.createElement("p");
    p.className = "error"; p.textContent = "Viewer error: " + message;
    document.body.prepend(p);
    document.body.dataset.error = message;
  }

  $("summary").textContent = `${D.family} \u00b7 ${D.title} \u00b7 image ${D.image.width}\u00d7${D.image.height}, ` +
    `${N} image tokens in ${D.views.length} view${D.views.length > 1 ? "s" : ""} (${D.views.map((v) => v.name).join(", ")})`;
  tokenStrip();
  render();
  document.body.dataset.ready = "true";
})();
