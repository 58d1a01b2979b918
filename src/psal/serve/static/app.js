// psal serve: the page. Plain JavaScript, no build step, nothing loaded from elsewhere.
//
// The picture is drawn at its own size on #picture; the mask is painted at the same size on
// #mask (CSS scales both to the screen). Strokes are kept as lists of points so that Ctrl+Z can
// replay all but the last. Run sends the original file (never a re-encoded copy) with the mask
// as a black-and-white PNG, polls GET /api/jobs/{id} for the progress bar, and shows the PNG
// that comes back beside the picture; Download saves it at full resolution.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  picture: null, // {file, bitmap, width, height, name}
  reference: null,
  source: null,
  strokes: [], // {erase, size, points: [[x, y], ...]}
  stroke: null, // the stroke being drawn
  result: null, // {url, bitmap}
  busy: false,
  maxPixels: null,
  zoom: 1, // screen pixels per picture pixel
};

const TASK_LABEL = { inpaint: "inpainting", upscale: "upscaling", colorize: "colorizing", reconstruct: "reconstructing" };

// ---------------------------------------------------------------------------------------------
// Status line and progress bar

function say(text, error = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", error);
}

function setProgress(done, total) {
  const bar = $("progress");
  if (total > 0) {
    bar.max = total;
    bar.value = done;
  } else {
    bar.removeAttribute("value"); // indeterminate
  }
}

// ---------------------------------------------------------------------------------------------
// Opening pictures

async function decode(file) {
  // The pixels as stored: no EXIF rotation, as the server reads them.
  try {
    return await createImageBitmap(file, { imageOrientation: "none" });
  } catch (err) {
    return await createImageBitmap(file);
  }
}

async function openPicture(file, slot) {
  if (!file) return;
  let bitmap;
  try {
    bitmap = await decode(file);
  } catch (err) {
    say(`Cannot display ${file.name} in this browser; open a PNG, JPEG, WebP or BMP picture.`, true);
    return;
  }
  const entry = { file, bitmap, width: bitmap.width, height: bitmap.height, name: file.name || "picture.png" };
  if (slot === "picture") {
    state.picture = entry;
    state.strokes = [];
    clearResult();
    const pixels = entry.width * entry.height;
    $("picture-info").textContent = `${entry.name}: ${entry.width} × ${entry.height}`;
    for (const id of ["picture", "mask", "before"]) {
      $(id).width = entry.width;
      $(id).height = entry.height;
    }
    $("picture").getContext("2d").drawImage(bitmap, 0, 0);
    $("before").getContext("2d").drawImage(bitmap, 0, 0);
    redrawMask();
    $("empty").hidden = true;
    $("modes").hidden = true;
    showView("edit");
    layout();
    if (state.maxPixels !== null && pixels > state.maxPixels) {
      say(`This picture has ${pixels} pixels, more than the ${state.maxPixels} this server takes; resize it first.`, true);
    } else {
      say(currentTask() === "inpaint" ? "Paint over what should go, then Run." : "Ready: Run.");
    }
  } else {
    state[slot] = entry;
    const thumb = $(`${slot}-thumb`);
    const canvas = document.createElement("canvas");
    canvas.width = entry.width;
    canvas.height = entry.height;
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    const label = document.createElement("span");
    label.textContent = `${entry.name} (${entry.width} × ${entry.height})`;
    thumb.replaceChildren(canvas, label);
  }
  updateRun();
}

// ---------------------------------------------------------------------------------------------
// Layout: fit the picture to the space there is (small pictures are enlarged, up to 16 times)

function layout() {
  if (!state.picture) return;
  const view = $("view");
  const { width, height } = state.picture;
  const availW = Math.max(200, view.clientWidth - 8);
  const top = view.getBoundingClientRect().top + window.scrollY;
  const availH = Math.max(200, window.innerHeight - top - 90);
  state.zoom = Math.min(availW / width, availH / height, 16);
  const w = Math.round(width * state.zoom);
  const h = Math.round(height * state.zoom);
  for (const id of ["picture", "before"]) {
    const c = $(id);
    c.style.width = `${w}px`;
    c.style.height = `${h}px`;
    c.style.imageRendering = state.zoom >= 2 ? "pixelated" : "auto";
  }
  const after = $("after");
  after.style.imageRendering = after.width && w / after.width >= 2 ? "pixelated" : "auto";
  $("split").style.maxWidth = `${w}px`;
  updateCursorSize();
}

// ---------------------------------------------------------------------------------------------
// The mask: painting, erasing, undo

function brushSize() {
  return Number($("brush").value);
}

function drawStroke(ctx, stroke, from = 0) {
  ctx.save();
  ctx.globalCompositeOperation = stroke.erase ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = "rgb(255, 40, 90)";
  ctx.lineWidth = stroke.size;
  ctx.lineCap = ctx.lineJoin = "round";
  const pts = stroke.points;
  if (pts.length === 1) {
    ctx.beginPath();
    ctx.arc(pts[0][0], pts[0][1], stroke.size / 2, 0, 2 * Math.PI);
    ctx.fill();
  } else {
    ctx.beginPath();
    const start = Math.max(0, from - 1);
    ctx.moveTo(pts[start][0], pts[start][1]);
    for (let i = start + 1; i < pts.length; i++) ctx.lineTo(pts[i][0], pts[i][1]);
    ctx.stroke();
  }
  ctx.restore();
}

function redrawMask() {
  const canvas = $("mask");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (const stroke of state.strokes) drawStroke(ctx, stroke);
}

function pointOf(event) {
  const rect = $("mask").getBoundingClientRect();
  const { width, height } = state.picture;
  return [((event.clientX - rect.left) * width) / rect.width, ((event.clientY - rect.top) * height) / rect.height];
}

function canPaint() {
  return state.picture && !state.busy && currentTask() === "inpaint" && currentView() === "edit";
}

function startStroke(event) {
  if (!canPaint() || event.button !== 0) return;
  event.preventDefault();
  $("mask").setPointerCapture(event.pointerId);
  const erase = document.querySelector('input[name="tool"]:checked').value === "erase";
  state.stroke = { erase, size: brushSize(), points: [pointOf(event)] };
  drawStroke($("mask").getContext("2d"), state.stroke);
}

function continueStroke(event) {
  moveCursor(event);
  if (!state.stroke) return;
  const pts = state.stroke.points;
  pts.push(pointOf(event));
  drawStroke($("mask").getContext("2d"), state.stroke, pts.length - 1);
}

function endStroke() {
  if (!state.stroke) return;
  state.strokes.push(state.stroke);
  state.stroke = null;
  updateRun();
}

function undo() {
  if (state.busy || !state.strokes.length) return;
  state.strokes.pop();
  redrawMask();
  updateRun();
}

function clearMask() {
  if (state.busy) return;
  state.strokes = [];
  redrawMask();
  updateRun();
}

function updateCursorSize() {
  const size = brushSize() * state.zoom;
  const cursor = $("cursor");
  cursor.style.width = cursor.style.height = `${size}px`;
}

function moveCursor(event) {
  const cursor = $("cursor");
  if (!canPaint()) {
    cursor.hidden = true;
    return;
  }
  const rect = $("mask").getBoundingClientRect();
  cursor.hidden = false;
  cursor.style.left = `${event.clientX - rect.left}px`;
  cursor.style.top = `${event.clientY - rect.top}px`;
}

// The mask as the server takes it: white where painted, black elsewhere, at the picture's size.
function maskImage() {
  const { width, height } = state.picture;
  const painted = $("mask").getContext("2d").getImageData(0, 0, width, height).data;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(width, height);
  let count = 0;
  for (let i = 0; i < width * height; i++) {
    const v = painted[4 * i + 3] >= 128 ? 255 : 0;
    count += v > 0;
    out.data[4 * i] = out.data[4 * i + 1] = out.data[4 * i + 2] = v;
    out.data[4 * i + 3] = 255;
  }
  ctx.putImageData(out, 0, 0);
  return { canvas, count };
}

// ---------------------------------------------------------------------------------------------
// Task, view and the Run button

function currentTask() {
  return document.querySelector('input[name="task"]:checked').value;
}

function currentView() {
  return document.querySelector('input[name="view"]:checked').value;
}

function showTask() {
  const task = currentTask();
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.dataset.task !== task;
  $("mask").classList.toggle("off", task !== "inpaint");
  updateRun();
}

function showView(view) {
  document.querySelector(`input[name="view"][value="${view}"]`).checked = true;
  const compare = view === "compare" && state.result !== null;
  $("editor").hidden = !state.picture || compare;
  $("compare").hidden = !compare;
  $("split").hidden = !compare;
}

function updateRun() {
  const task = currentTask();
  let ready = state.picture !== null && !state.busy;
  if (task === "inpaint") ready = ready && state.strokes.length > 0;
  if (task === "colorize") ready = ready && state.reference !== null;
  if (task === "reconstruct") ready = ready && state.source !== null;
  $("run").disabled = !ready;
  $("undo").disabled = state.busy || !state.strokes.length;
  $("clear").disabled = state.busy || !state.strokes.length;
}

function setBusy(busy) {
  state.busy = busy;
  for (const el of document.querySelectorAll(".controls input, .controls select")) el.disabled = busy;
  updateRun();
}

function clearResult() {
  if (state.result) URL.revokeObjectURL(state.result.url);
  state.result = null;
  $("download").hidden = true;
  $("download").removeAttribute("href");
  $("modes").hidden = true;
}

function updateSplit() {
  const split = Number($("split").value);
  $("after").style.clipPath = `inset(0 0 0 ${split}%)`;
  $("divider").style.left = `${split}%`;
}

function jobId() {
  return "j" + Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
}

// Polls the job's progress until stop() is called.
function watch(job, label) {
  let stopped = false;
  (async () => {
    while (!stopped) {
      await new Promise((resolve) => setTimeout(resolve, 250));
      if (stopped) break;
      try {
        const response = await fetch(`/api/jobs/${job}`, { cache: "no-store" });
        if (stopped) break;
        if (response.status === 404) continue; // still uploading
        const s = await response.json();
        if (s.state === "queued") {
          setProgress(0, 0);
          say(`Waiting: ${s.ahead} job${s.ahead === 1 ? "" : "s"} before this one.`);
        } else if (s.state === "running") {
          setProgress(s.done, s.total);
          say(s.total > 1 ? `${label}: ${s.done} / ${s.total}` : `${label}…`);
        }
      } catch (err) {
        // the answer to the request itself will tell
      }
    }
  })();
  return () => {
    stopped = true;
  };
}

async function run() {
  if (!state.picture || state.busy) return;
  const task = currentTask();
  const form = new FormData();
  form.append("image", state.picture.file, state.picture.name);
  if (task === "inpaint") {
    const { canvas, count } = maskImage();
    if (count === 0) {
      say("Paint over the region to fill first.", true);
      return;
    }
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    form.append("mask", blob, "mask.png");
  } else if (task === "upscale") {
    form.append("scale", $("scale").value);
    form.append("method", $("method").value);
  } else if (task === "colorize") {
    form.append("reference", state.reference.file, state.reference.name);
  } else if (task === "reconstruct") {
    form.append("source", state.source.file, state.source.name);
  }
  const seed = $("seed").value.trim();
  form.append("seed", seed === "" ? "0" : seed);
  const job = jobId();
  form.append("job", job);

  setBusy(true);
  clearResult();
  showView("edit");
  setProgress(0, 0);
  say("Sending…");
  const label = TASK_LABEL[task][0].toUpperCase() + TASK_LABEL[task].slice(1);
  const stop = watch(job, label);
  const t0 = performance.now();
  try {
    const response = await fetch(`/api/${task}`, { method: "POST", body: form });
    stop();
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        message = (await response.json()).error || message;
      } catch (err) {
        // not JSON: keep the status line
      }
      setProgress(0, 1);
      say(message, true);
      return;
    }
    const blob = await response.blob();
    await showResult(blob, task, (performance.now() - t0) / 1000);
  } catch (err) {
    stop();
    setProgress(0, 1);
    say(`The server did not answer (${err.message}).`, true);
  } finally {
    setBusy(false);
  }
}

async function showResult(blob, task, seconds) {
  const bitmap = await createImageBitmap(blob);
  const after = $("after");
  after.width = bitmap.width;
  after.height = bitmap.height;
  after.getContext("2d").drawImage(bitmap, 0, 0);
  const url = URL.createObjectURL(blob);
  state.result = { url, bitmap };
  const base = state.picture.name.replace(/\.[^.]*$/, "") || "picture";
  const suffix = task === "upscale" ? `upscale_x${$("scale").value}` : task;
  const link = $("download");
  link.href = url;
  link.download = `${base}_${suffix}.png`;
  link.hidden = false;
  $("modes").hidden = false;
  setProgress(1, 1);
  say(`Done in ${seconds.toFixed(1)} s: ${bitmap.width} × ${bitmap.height}. Drag the slider to compare.`);
  showView("compare");
  updateSplit();
  layout();
}

// ---------------------------------------------------------------------------------------------
// Wiring

async function health() {
  const el = $("server");
  try {
    const response = await fetch("/api/health", { cache: "no-store" });
    const h = await response.json();
    state.maxPixels = h.max_pixels;
    const limit = h.max_pixels ? ` · up to ${(h.max_pixels / 1e6).toFixed(1)} MP` : "";
    el.textContent = `psal ${h.version} · ${h.device}${limit}`;
    el.classList.remove("down");
  } catch (err) {
    el.textContent = "server not reachable";
    el.classList.add("down");
  }
}

function wire() {
  $("file").addEventListener("change", (e) => openPicture(e.target.files[0], "picture"));
  $("reference-file").addEventListener("change", (e) => openPicture(e.target.files[0], "reference"));
  $("source-file").addEventListener("change", (e) => openPicture(e.target.files[0], "source"));
  for (const input of document.querySelectorAll('input[name="task"]')) input.addEventListener("change", showTask);
  for (const input of document.querySelectorAll('input[name="view"]')) input.addEventListener("change", () => showView(currentView()));
  $("brush").addEventListener("input", () => {
    $("brush-size").textContent = $("brush").value;
    updateCursorSize();
  });
  $("undo").addEventListener("click", undo);
  $("clear").addEventListener("click", clearMask);
  $("run").addEventListener("click", run);
  $("split").addEventListener("input", updateSplit);

  const mask = $("mask");
  mask.addEventListener("pointerdown", startStroke);
  mask.addEventListener("pointermove", continueStroke);
  mask.addEventListener("pointerup", endStroke);
  mask.addEventListener("pointercancel", endStroke);
  mask.addEventListener("pointerleave", () => ($("cursor").hidden = true));

  document.addEventListener("keydown", (event) => {
    const typing = event.target.matches('input[type="number"], input[type="text"]');
    if ((event.ctrlKey || event.metaKey) && !event.shiftKey && event.key.toLowerCase() === "z" && !typing) {
      event.preventDefault();
      undo();
    }
  });

  // Drag and drop: onto a reference or source box for that slot, anywhere else for the picture.
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    $("view").classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) $("view").classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    $("view").classList.remove("dragging");
    if (state.busy) return;
    const file = event.dataTransfer.files[0];
    const box = event.target.closest("[data-slot]");
    openPicture(file, box ? box.dataset.slot : "picture");
  });
  window.addEventListener("resize", layout);
}

wire();
showTask();
health();
