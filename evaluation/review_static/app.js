// The review page: list the cases, show one, edit its anchor, propagate it, accept it.
"use strict";

const state = {
  cases: [],
  sort: { key: "dsc", direction: 1 }, // ascending DSC: the worst case first
  view: null, // the open case as /api/case gives it
  keySlice: 1,
  boxes: [], // [x1, y1, x2, y2] in the slice frame (pixel edges)
  selected: -1,
  proposal: null, // the last propagated anchor and its result
  drag: null,
  image: null, // the editor's slice picture
};

const $ = (selector) => document.querySelector(selector);

function element(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function fixed(value, digits = 3) {
  return value === null || value === undefined ? "" : Number(value).toFixed(digits);
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const value = await response.json();
  if (!response.ok) throw new Error(value.error || `${path}: status ${response.status}`);
  return value;
}

function say(text, error = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", error);
}

// ---- the case list

async function loadCases() {
  const listing = await api("/api/cases");
  state.cases = listing.cases;
  $("#folder").textContent =
    `${listing.folder} (${listing.kind}; ${listing.cases.length} cases; ` +
    `${listing.num_slices} slices of ${listing.slice_size} px; propagator ${listing.propagator})`;
  // the row column only where the folder holds several rows (else the header names it)
  const rows = new Set(listing.cases.map((c) => c.row));
  document.body.classList.toggle("evaluation", listing.kind === "evaluation" && rows.size > 1);
  if (listing.kind === "evaluation" && rows.size === 1) {
    $("#folder").textContent += ` · row ${[...rows][0]}`;
  }
  renderCases();
}

function compare(a, b, key) {
  const x = a[key], y = b[key];
  const missing = (v) => v === null || v === undefined || v === "";
  if (missing(x) || missing(y)) return missing(x) - missing(y); // blanks last, either way
  if (typeof x === "number" && typeof y === "number") return (x - y) * state.sort.direction;
  return String(x).localeCompare(String(y)) * state.sort.direction;
}

function renderCases() {
  const rows = [...state.cases].sort((a, b) => compare(a, b, state.sort.key));
  const body = $("#cases tbody");
  body.replaceChildren();
  for (const c of rows) {
    const tr = element("tr", null, { "data-case": c.id });
    tr.append(
      // an evaluation case's id is "<row> | <manifest id>": the row has its own column
      element("td", c.row ? c.id.slice(c.row.length + 3) : c.id, { class: "id", title: c.id }),
      element("td", c.row, { class: "evaluation-only row", title: c.row }),
      element("td", fixed(c.dsc), { class: "number dsc" }),
      element("td", fixed(c.agreement, 2), { class: "number" }),
      element("td", c.corrected || "", { class: "number" }),
      element("td", c.query, { class: "query", title: c.query }),
    );
    if (!c.ok) tr.title = "the answer did not parse";
    if (state.view && state.view.id === c.id) tr.classList.add("open");
    tr.addEventListener("click", () => openCase(c.id));
    body.append(tr);
  }
  for (const th of document.querySelectorAll("#cases th")) {
    th.classList.toggle("sorted", th.dataset.sort === state.sort.key);
    th.classList.toggle("descending", state.sort.direction < 0);
  }
}

function sortBy(key) {
  if (state.sort.key === key) state.sort.direction = -state.sort.direction;
  else state.sort = { key, direction: 1 }; // every column starts ascending: worst DSC first
  renderCases();
}

// ---- one case

async function openCase(id) {
  say("loading…");
  try {
    state.view = await api(`/api/case?case=${encodeURIComponent(id)}`);
  } catch (error) {
    say(error.message, true);
    return;
  }
  const view = state.view;
  $("#case").hidden = false;
  $("#case-title").textContent = view.id;
  $("#case-query").textContent = `“${view.query}” · ${view.image}`;
  $("#think").value = view.think;
  $("#failure").textContent = view.failure ? `The answer did not parse: ${view.failure}` : "";
  $("#show-truth").parentElement.hidden = !view.has_truth;
  renderSampled();
  renderCorrections();
  resetAnchor();
  $("#overlay").value = "answer";
  renderCases();
  history.replaceState(null, "", `#case=${encodeURIComponent(id)}`);
  say("");
}

function resetAnchor() {
  const anchor = state.view.anchor;
  state.proposal = null;
  $("#overlay").value = "answer";
  useAnchor(anchor ? anchor.key_slice : Math.ceil(state.view.num_slices / 2),
            anchor ? anchor.boxes : []);
  renderSlices();
  renderMetrics();
}

function useAnchor(keySlice, boxes) {
  state.keySlice = keySlice;
  state.boxes = boxes.map((b) => [...b]);
  state.selected = -1;
  anchorChanged();
}

function anchorChanged() {
  const current = JSON.stringify([state.keySlice, state.boxes]);
  const shown = state.proposal && JSON.stringify([state.proposal.key_slice, state.proposal.boxes]);
  $("#accept").disabled = current !== shown;
  const z = state.view.source_index[state.keySlice - 1];
  $("#key-label").textContent =
    `key slice ${state.keySlice} of ${state.view.num_slices} (source ${z}), ` +
    `${state.boxes.length} box${state.boxes.length === 1 ? "" : "es"}`;
  for (const figure of document.querySelectorAll("#slices figure")) {
    figure.classList.toggle("key", Number(figure.dataset.k) === state.keySlice);
  }
  loadEditorImage();
}

function sliceUrl(k) {
  const view = state.view;
  const mode = $("#overlay").value;
  const params = new URLSearchParams({ case: view.id, k, mask: mode });
  if (mode === "proposal") {
    if (!state.proposal) params.set("mask", "none");
    else {
      params.set("key_slice", state.proposal.key_slice);
      params.set("boxes", JSON.stringify(state.proposal.boxes));
    }
  }
  if (view.has_truth && $("#show-truth").checked) params.set("truth", "1");
  return `/api/slice.png?${params}`;
}

function renderSlices() {
  const view = state.view;
  const masked = new Set(
    $("#overlay").value === "proposal" && state.proposal ? state.proposal.mask_slices
      : $("#overlay").value === "answer" ? view.mask_slices : []);
  const grid = $("#slices");
  grid.replaceChildren();
  for (let k = 1; k <= view.num_slices; k++) {
    const figure = element("figure", null, { "data-k": k });
    figure.append(element("img", null, { src: sliceUrl(k), alt: `slice ${k}`, loading: "lazy" }),
                  element("figcaption", `${k} · z ${view.source_index[k - 1]}`));
    figure.classList.toggle("key", k === state.keySlice);
    figure.classList.toggle("masked", masked.has(k));
    figure.addEventListener("click", () => {
      state.keySlice = k;
      anchorChanged();
    });
    grid.append(figure);
  }
  loadEditorImage();
}

function loadEditorImage() {
  const image = new Image();
  image.onload = () => {
    if (image === state.image) drawEditor();
  };
  image.src = sliceUrl(state.keySlice);
  state.image = image;
  drawEditor();
}

function drawEditor() {
  const canvas = $("#editor");
  const context = canvas.getContext("2d");
  const scale = canvas.width / state.view.size;
  context.fillStyle = "#000";
  context.fillRect(0, 0, canvas.width, canvas.height);
  if (state.image && state.image.complete && state.image.naturalWidth) {
    context.imageSmoothingEnabled = true;
    context.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  }
  state.boxes.forEach(([x1, y1, x2, y2], i) => {
    context.strokeStyle = i === state.selected ? "#3fd0ff" : "#f5d90a";
    context.lineWidth = 2;
    context.strokeRect(x1 * scale, y1 * scale, (x2 - x1) * scale, (y2 - y1) * scale);
  });
}

function renderMetrics() {
  const view = state.view;
  const rows = [
    ["DSC", fixed(view.dsc)],
    ["agreement", fixed(view.agreement, 2)],
  ];
  if (view.kind === "evaluation") rows.push(["DSC of the mask shown (propagated here)",
                                             fixed(view.dsc_shown_mask)]);
  if (state.proposal) {
    rows.push(["proposal DSC", view.has_truth ? fixed(state.proposal.dsc) : "no ground truth"]);
    rows.push(["proposal slices with mask", state.proposal.mask_slices.length]);
  }
  for (const [name, value] of Object.entries(view.metrics)) {
    const shown = typeof value === "object" ? JSON.stringify(value)
      : typeof value === "number" && !Number.isInteger(value) ? value.toFixed(3) : value;
    rows.push([name, shown]);
  }
  rows.push(["propagator of Propagate", view.propagator]);
  const table = $("#metrics");
  table.replaceChildren();
  for (const [name, value] of rows) {
    const tr = element("tr");
    tr.append(element("td", name), element("td", value, name === "proposal DSC"
      ? { id: "proposal-dsc" } : {}));
    table.append(tr);
  }
}

function renderSampled() {
  const list = $("#sampled");
  list.replaceChildren();
  $("#sampled-block").hidden = state.view.sampled.length === 0;
  for (const sample of state.view.sampled) {
    const agreement = sample.agreement === null ? "" : ` · agreement ${fixed(sample.agreement, 2)}`;
    const text = sample.key_slice === null ? `does not parse: ${sample.failure}`
      : `slice ${sample.key_slice}, boxes ${JSON.stringify(sample.boxes)}${agreement}`;
    const item = element("li", text);
    if (sample.answer) item.title = sample.answer;
    if (sample.key_slice !== null) {
      item.addEventListener("click", () => useAnchor(sample.key_slice, sample.boxes));
    }
    list.append(item);
  }
}

function renderCorrections() {
  const list = $("#corrections");
  list.replaceChildren();
  for (const row of state.view.corrections) {
    const dsc = row.dsc === null ? "" : `, DSC ${fixed(row.dsc)}`;
    list.append(element("li", `#${row.number}: slice ${row.key_slice}, ` +
                        `boxes ${JSON.stringify(row.bbox_2d_list)}${dsc} → ${row.mask}`));
  }
  if (!state.view.corrections.length) list.append(element("li", "none yet"));
}

async function propagate() {
  const body = { case: state.view.id, key_slice: state.keySlice, boxes: state.boxes };
  $("#propagate").disabled = true;
  say("propagating…");
  try {
    const result = await api("/api/propagate", body);
    state.proposal = result;
    $("#overlay").value = "proposal";
    renderSlices();
    renderMetrics();
    anchorChanged();
    const dsc = result.dsc === null ? "" : `, DSC ${fixed(result.dsc)}`;
    say(`propagated by ${result.propagator}: mask on ${result.mask_slices.length} slices${dsc}`);
  } catch (error) {
    say(error.message, true);
  } finally {
    $("#propagate").disabled = false;
  }
}

async function accept() {
  const body = {
    case: state.view.id, key_slice: state.keySlice, boxes: state.boxes, think: $("#think").value,
  };
  $("#accept").disabled = true;
  say("saving…");
  try {
    const row = await api("/api/accept", body);
    state.view.corrections.push(row);
    renderCorrections();
    const listed = state.cases.find((c) => c.id === state.view.id);
    if (listed) listed.corrected += 1;
    renderCases();
    say(`accepted: row ${row.number} of corrections.jsonl, mask ${row.mask}`);
  } catch (error) {
    say(error.message, true);
    $("#accept").disabled = false;
  }
}

// ---- the editor's mouse: draw a box, or drag one

function framePoint(event) {
  const canvas = $("#editor");
  const rect = canvas.getBoundingClientRect();
  const size = state.view.size;
  const clamp = (v) => Math.min(Math.max(v, 0), size);
  return [clamp(((event.clientX - rect.left) / rect.width) * size),
          clamp(((event.clientY - rect.top) / rect.height) * size)];
}

function onMouseDown(event) {
  if (!state.view || event.button !== 0) return;
  event.preventDefault();
  const [x, y] = framePoint(event);
  let hit = -1;
  state.boxes.forEach(([x1, y1, x2, y2], i) => {
    if (x >= x1 && x <= x2 && y >= y1 && y <= y2) hit = i;
  });
  if (hit >= 0) {
    state.selected = hit;
    state.drag = { mode: "move", start: [x, y], original: [...state.boxes[hit]] };
  } else {
    state.boxes.push([Math.floor(x), Math.floor(y), Math.floor(x), Math.floor(y)]);
    state.selected = state.boxes.length - 1;
    state.drag = { mode: "draw", start: [x, y] };
  }
  drawEditor();
}

function onMouseMove(event) {
  if (!state.drag) return;
  const [x, y] = framePoint(event);
  const size = state.view.size;
  const drag = state.drag;
  if (drag.mode === "draw") {
    const [sx, sy] = drag.start;
    state.boxes[state.selected] = [Math.floor(Math.min(sx, x)), Math.floor(Math.min(sy, y)),
                                   Math.ceil(Math.max(sx, x)), Math.ceil(Math.max(sy, y))];
  } else {
    const [x1, y1, x2, y2] = drag.original;
    const dx = Math.round(Math.min(Math.max(x - drag.start[0], -x1), size - x2));
    const dy = Math.round(Math.min(Math.max(y - drag.start[1], -y1), size - y2));
    state.boxes[state.selected] = [x1 + dx, y1 + dy, x2 + dx, y2 + dy];
  }
  drawEditor();
}

function onMouseUp(event) {
  if (!state.drag) return;
  onMouseMove(event);
  const [x1, y1, x2, y2] = state.boxes[state.selected];
  if (state.drag.mode === "draw" && (x2 - x1 < 2 || y2 - y1 < 2)) {
    state.boxes.splice(state.selected, 1); // a click, not a box
    state.selected = -1;
  }
  state.drag = null;
  anchorChanged();
}

function deleteSelected() {
  if (state.selected < 0) return;
  state.boxes.splice(state.selected, 1);
  state.selected = -1;
  anchorChanged();
}

// ---- wiring

document.addEventListener("DOMContentLoaded", async () => {
  for (const th of document.querySelectorAll("#cases th")) {
    th.addEventListener("click", () => sortBy(th.dataset.sort));
  }
  const canvas = $("#editor");
  canvas.addEventListener("mousedown", onMouseDown);
  window.addEventListener("mousemove", onMouseMove);
  window.addEventListener("mouseup", onMouseUp);
  window.addEventListener("keydown", (event) => {
    if ((event.key === "Delete" || event.key === "Backspace") && event.target === document.body) {
      deleteSelected();
    }
  });
  $("#delete-box").addEventListener("click", deleteSelected);
  $("#clear-boxes").addEventListener("click", () => useAnchor(state.keySlice, []));
  $("#reset").addEventListener("click", resetAnchor);
  $("#propagate").addEventListener("click", propagate);
  $("#accept").addEventListener("click", accept);
  $("#overlay").addEventListener("change", renderSlices);
  $("#show-truth").addEventListener("change", renderSlices);
  try {
    await loadCases();
  } catch (error) {
    $("#folder").textContent = error.message;
    return;
  }
  const wanted = new URLSearchParams(location.hash.slice(1)).get("case");
  if (wanted && state.cases.some((c) => c.id === wanted)) openCase(wanted);
});
