// clipengine web page: zero-shot classification chart and text-to-image search. Plain DOM, no build step.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const keyInput = $("api-key");
  let chosenFile = null;
  const objectUrls = [];

  keyInput.value = sessionStorage.getItem("clipengine-api-key") || "";
  keyInput.addEventListener("change", () => {
    sessionStorage.setItem("clipengine-api-key", keyInput.value.trim());
    loadInfo();
  });

  // fetch() refuses a header value outside Latin-1 (a key typed with another keyboard layout) with a
  // TypeError that reads like a network failure: name the key as the problem instead.
  function authHeaders() {
    const key = keyInput.value.trim();
    if (/[\0\r\n]|[^\u0000-\u00ff]/.test(key)) {
      const err = new Error("The API key holds a character an HTTP header cannot carry (only Latin-1 letters): retype it.");
      err.name = "ApiKeyError";
      throw err;
    }
    return key ? { Authorization: "Bearer " + key } : {};
  }

  // Every URL is relative to this page (served at the service's root): behind a reverse proxy that
  // mounts the service under a sub-path (https://host/clip/), a path from the host's root leaves it.
  // fetch + JSON with the API error shape {"error": {"code", "message"}} turned into an Error.
  async function callApi(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = Object.assign({}, authHeaders(), opts.headers || {});
    const started = performance.now();
    let response;
    try {
      response = await fetch(path, opts);
    } catch (err) {  // a rejected fetch is "Failed to fetch" in Chromium: say what it means
      throw new Error("No answer from the server: is it running and reachable? (" + err.message + ")");
    }
    const roundTrip = performance.now() - started;
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const err = body && body.error ? body.error : { code: "http_" + response.status, message: response.statusText };
      throw new Error(err.message + " (" + err.code + ", HTTP " + response.status + ")");
    }
    if (body === null || typeof body !== "object") {  // e.g. a proxy's HTML page: not our API's answer
      throw new Error("The answer was not the API's JSON (HTTP " + response.status + "): is a proxy in between?");
    }
    return { body: body, roundTrip: roundTrip };
  }

  function showError(el, err) {
    el.textContent = err ? String(err.message || err) : "";
    el.hidden = !err;
  }

  function formatTime(serverMs, roundTripMs) {
    return "server " + serverMs.toFixed(1) + " ms · round trip " + roundTripMs.toFixed(1) + " ms";
  }

  function fidelityText(f) {
    if (!f) return null;
    const parts = [];
    if (f.towers) {
      const measured = Object.entries(f.towers).filter(([, p]) => p);
      const worst = measured.length ? Math.min(...measured.map(([, p]) => p.min_cos)) : null;
      parts.push(f.precision + (worst != null ? " · min cos " + worst.toFixed(5) : " · deviation unmeasured"));
    }
    if (f.decode) parts.push(f.decode.mode);
    const towers = f.towers ? Object.entries(f.towers).map(([t, p]) => t + " " + (p ? p.min_cos.toFixed(5) : "unmeasured")).join(", ") : "";
    const full = (f.towers ? f.backend + " " + f.precision + " vs fp32: min cosine " + towers + " (" + f.measured + ")" : "") +
      (f.reference ? " [" + f.reference + "]" : "") + (f.decode ? " " + f.decode.mode + " [" + (f.decode.reference || "unmeasured") + "]" : "");
    return { short: parts.join(" · "), full: full.trim() };
  }

  function recallText(index) {
    if (!index || !index.kind || index.kind === "flat") return null;
    return index.recall ? index.kind + " recall@" + index.recall.k + " " + index.recall.recall.toFixed(3) : index.kind + " recall unmeasured";
  }

  async function loadInfo() {
    try {
      const { body } = await callApi("v1/info");
      const fidelity = fidelityText(body.fidelity);  // a lower precision states its deviation from fp32
      $("model-badge").textContent = body.model + " · " + body.embed_dim + "-d" + (fidelity ? " · " + fidelity.short : "");
      $("model-badge").title = fidelity ? fidelity.full : "Model served (fp32)";
      const recall = recallText(body.index);  // an approximate index states its measured recall
      $("index-badge").textContent = body.index ? "index: " + (body.index.size != null ? body.index.size + " images" : "loaded") + (recall ? " · " + recall : "") : "no index";
      $("no-index").hidden = !!body.index;
      $("search-btn").disabled = !body.index;
    } catch (err) {
      $("model-badge").textContent = err.name === "ApiKeyError" ? "API key unusable" : /unauthorized/.test(err.message) ? "API key needed" : "offline";
    }
  }

  // ---- image picking ----------------------------------------------------------------------
  const dropZone = $("drop-zone");
  const fileInput = $("file-input");

  function chooseFile(file) {
    if (!file) return;
    chosenFile = file;
    const preview = $("preview");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.alt = file.name;
    preview.hidden = false;
    $("drop-text").hidden = true;
    dropZone.classList.add("has-image");
  }

  dropZone.addEventListener("click", () => fileInput.click());
  dropZone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") fileInput.click(); });
  fileInput.addEventListener("change", () => chooseFile(fileInput.files[0]));
  ["dragenter", "dragover"].forEach((t) => dropZone.addEventListener(t, (e) => { e.preventDefault(); dropZone.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => dropZone.addEventListener(t, (e) => { e.preventDefault(); dropZone.classList.remove("over"); }));
  dropZone.addEventListener("drop", (e) => chooseFile(e.dataTransfer.files[0]));

  // ---- classification ---------------------------------------------------------------------
  function renderChart(labels) {
    const chart = $("chart");
    chart.textContent = "";
    for (const item of labels) {
      const row = document.createElement("div");
      row.className = "bar-row";
      const name = document.createElement("span");
      name.className = "bar-label";
      name.textContent = item.label;
      name.title = item.label;
      const track = document.createElement("div");
      track.className = "bar-track";
      const fill = document.createElement("div");
      fill.className = "bar-fill";
      fill.style.width = Math.max(0.5, item.probability * 100).toFixed(2) + "%";
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = (item.probability * 100).toFixed(1) + "%";
      row.dataset.probability = String(item.probability);
      row.append(name, track, value);
      chart.appendChild(row);
    }
  }

  // The "top N" field as the server's top_k, or null for every label. The number field also takes
  // "1e3", "2.0" and 20-digit values as valid, which top_k (ASCII digits, up to 18) refuses: send the
  // integer, and nothing when N keeps every label anyway. Anything else (0, -1, 2.5) goes as typed,
  // for the server to refuse with its reason.
  function topKField(labelCount) {
    const field = $("top-k");
    const typed = field.value.trim();
    if (!typed) return null;
    const n = field.valueAsNumber;
    if (!Number.isInteger(n) || n < 1) return typed;
    return n >= labelCount ? null : String(n);
  }

  $("classify-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const errorBox = $("classify-error");
    showError(errorBox, null);
    if (!chosenFile) { showError(errorBox, new Error("Choose an image first.")); return; }
    const labels = $("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
    if (!labels.length) { showError(errorBox, new Error("Type at least one label.")); return; }
    const form = new FormData();
    form.append("files", chosenFile, chosenFile.name);
    form.append("labels", labels.join(","));
    const templates = $("templates").value.trim();
    if (templates) form.append("templates", templates);
    const topK = topKField(labels.length);
    if (topK) form.append("top_k", topK);
    const button = $("classify-btn");
    button.disabled = true;
    try {
      const { body, roundTrip } = await callApi("v1/classify", { method: "POST", body: form });
      renderChart(body.results[0].labels);
      $("classify-time").textContent = formatTime(body.elapsed_ms, roundTrip);
    } catch (err) {
      // The last answer's bars would read as this image's: the error replaces them.
      $("chart").textContent = "";
      $("classify-time").textContent = "";
      showError(errorBox, err);
    } finally {
      button.disabled = false;
    }
  });

  // ---- search -----------------------------------------------------------------------------
  async function loadThumbnail(img, url) {
    try {
      const response = await fetch(url, { headers: authHeaders() });
      if (!response.ok) { img.alt = "unavailable"; return; }
      const objectUrl = URL.createObjectURL(await response.blob());
      objectUrls.push(objectUrl);
      img.src = objectUrl;
    } catch (err) {  // the server went away mid-grid: say so on the tile, not as an unhandled rejection
      img.alt = "unavailable";
    }
  }

  $("search-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const errorBox = $("search-error");
    showError(errorBox, null);
    const text = $("search-text").value.trim();
    if (!text) { showError(errorBox, new Error("Type what to look for.")); return; }
    const button = $("search-btn");
    button.disabled = true;
    try {
      const k = parseInt($("search-k").value, 10);
      const { body, roundTrip } = await callApi("v1/search", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text: text, k: k }),
      });
      while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
      const grid = $("results");
      grid.textContent = "";
      for (const hit of body.results) {
        const fig = document.createElement("figure");
        fig.className = "thumb";
        const img = document.createElement("img");
        img.alt = hit.id;
        img.loading = "lazy";
        const cap = document.createElement("figcaption");
        const id = document.createElement("span");
        id.className = "id";
        id.textContent = hit.id;
        id.title = hit.id;
        const score = document.createElement("span");
        score.className = "score";
        score.textContent = hit.score.toFixed(3);
        cap.append(id, score);
        fig.append(img, cap);
        grid.appendChild(fig);
        // Not hit.thumbnail_url: the server writes it from the host's root as it sees it, which is
        // not this page's behind a proxy that strips a sub-path.
        loadThumbnail(img, "v1/thumbnails/" + hit.id.split("/").map(encodeURIComponent).join("/"));
      }
      $("search-time").textContent = body.results.length + " results · " + formatTime(body.elapsed_ms, roundTrip);
    } catch (err) {
      $("results").textContent = "";  // the last query's hits would read as this one's
      $("search-time").textContent = "";
      showError(errorBox, err);
    } finally {
      button.disabled = false;
    }
  });

  loadInfo();
})();
