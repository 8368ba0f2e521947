// The MIO playground: drives this server's native API (POST /v1/run/{task}, GET /health) from the browser.
// Plain JavaScript, no build step, no external code (the page's Content-Security-Policy allows none).
"use strict";

(function () {
  // What each task takes: a text field (and which prompt fields it fills), a medium, or both.
  const TASKS = {
    caption: { media: "image", help: "Describe an image." },
    ask: { media: "any", text: "Question", fields: ["question", "instruction"],
      help: "Ask a question about an image, a recording or a video." },
    imagine: { text: "Description of the image", fields: ["caption"], help: "Generate an image from a description." },
    edit: { media: "image", text: "Instruction", fields: ["instruction"], help: "Change an image as instructed." },
    asr: { media: "audio", help: "Transcribe a recording." },
    tts: { text: "Text to speak", fields: ["text"], help: "Read text aloud." },
    speak: { text: "Question", fields: ["question"], help: "Answer a question out loud." },
    chat: { text: "Message", chat: true, help: "Chat with MIO." },
    interleave: { text: "Topic", fields: ["topic"], help: "A story with pictures in place." },
    video_caption: { media: "video", help: "Describe a video." },
  };
  const ACCEPT = { image: "image/*", audio: "audio/*", video: "video/*", any: "image/*,audio/*,video/*" };
  const FILE_LABEL = { image: "Image", audio: "Recording", video: "Video", any: "Image, recording or video" };
  const KEY_STORE = "mio-api-key";

  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("run-form"), task: $("task"), taskHelp: $("task-help"), textField: $("text-field"), text: $("text"),
    textLabel: $("text-label"), mediaField: $("media-field"), file: $("file"), fileLabel: $("file-label"),
    drop: $("drop"), chosen: $("file-chosen"), record: $("record"), clearFile: $("clear-file"),
    recordStatus: $("record-status"), keyPanel: $("key-panel"), key: $("api-key"), saveKey: $("save-key"),
    forgetKey: $("forget-key"), run: $("run"), stop: $("stop"), output: $("output"), status: $("status"),
    error: $("error"), results: $("results"), health: $("health"),
    settings: { max_new_tokens: $("max-new-tokens"), seed: $("seed"), steps: $("steps"), size: $("size") },
  };

  let chosenFile = null; // a File: chosen, dropped or recorded
  let controller = null; // aborts the run in flight
  let urls = []; // blob URLs of the last run, freed on the next

  // ---- small helpers ------------------------------------------------------------------------------
  function make(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function b64ToBytes(b64) {
    const binary = atob(b64);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  function blobUrl(blob) {
    const url = URL.createObjectURL(blob);
    urls.push(url);
    return url;
  }

  function fileToBase64(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).replace(/^data:[^,]*,/, ""));
      reader.onerror = () => reject(new Error("could not read " + file.name));
      reader.readAsDataURL(file);
    });
  }

  // 16-bit PCM WAV from mono float samples in [-1, 1].
  function wavBlob(samples, rate) {
    const buffer = new ArrayBuffer(44 + samples.length * 2);
    const view = new DataView(buffer);
    const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
    text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
    text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
    view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
    view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, samples.length * 2, true);
    for (let i = 0; i < samples.length; i++) {
      const s = Math.max(-1, Math.min(1, samples[i] || 0));
      view.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
    }
    return new Blob([buffer], { type: "audio/wav" });
  }

  function formatBytes(n) {
    if (typeof n !== "number") return "unknown";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function safeName(name) {
    return String(name || "output").replace(/[^\w.-]+/g, "_").slice(0, 60) || "output";
  }

  // ---- the API key ----------------------------------------------------------------------------------
  function apiKey() {
    return el.key.value.trim(); // filled from sessionStorage at start
  }

  function headers(extra) {
    const out = Object.assign({}, extra || {});
    const key = apiKey();
    if (key) out.Authorization = "Bearer " + key;
    return out;
  }

  function askForKey() {
    el.keyPanel.open = true;
    el.keyPanel.classList.add("needed");
    el.key.setAttribute("aria-invalid", "true");
    showError("This server needs an API key.", "Enter it under “API key” and press “Use this key”.");
  }

  el.saveKey.addEventListener("click", () => {
    const key = el.key.value.trim();
    try { if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE); } catch (e) { /* storage off */ }
    el.keyPanel.classList.remove("needed");
    el.key.removeAttribute("aria-invalid");
    hideError();
    setStatus(key ? "Key saved for this tab." : "No key set.");
    refreshHealth();
  });
  el.forgetKey.addEventListener("click", () => {
    try { sessionStorage.removeItem(KEY_STORE); } catch (e) { /* storage off */ }
    el.key.value = "";
    setStatus("Key forgotten.");
  });

  // ---- health ---------------------------------------------------------------------------------------
  async function refreshHealth() {
    try {
      const response = await fetch("/health", { headers: headers(), cache: "no-store" });
      if (response.status === 401) {
        el.health.textContent = "Server: an API key is needed.";
        askForKey();
        return;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      const h = await response.json();
      const loaded = Array.isArray(h.loaded) ? (h.loaded.length ? [...new Set(h.loaded)].join(", ") : "nothing yet") : String(h.loaded);
      el.health.textContent = "Model " + h.model + " · loaded: " + loaded + " · memory: " + formatBytes(h.memory_bytes) +
        (h.busy ? " · busy" : "") + " · mio " + h.version;
    } catch (e) {
      el.health.textContent = "Server: not reachable (" + e.message + ").";
    }
  }

  // ---- the form -------------------------------------------------------------------------------------
  function currentTask() { return TASKS[el.task.value] ? el.task.value : "caption"; }

  function updateTask() {
    const spec = TASKS[currentTask()];
    el.taskHelp.textContent = spec.help;
    el.textField.hidden = !spec.text;
    if (spec.text) el.textLabel.textContent = spec.text;
    el.mediaField.hidden = !spec.media;
    if (spec.media) {
      el.file.accept = ACCEPT[spec.media];
      el.fileLabel.textContent = FILE_LABEL[spec.media];
      el.record.hidden = !(spec.media === "audio" || spec.media === "any");
    }
  }
  el.task.addEventListener("change", updateTask);

  function setFile(file) {
    chosenFile = file || null;
    el.chosen.textContent = chosenFile ? "Chosen: " + chosenFile.name + " (" + formatBytes(chosenFile.size) + ")" : "";
  }
  el.file.addEventListener("change", () => setFile(el.file.files[0]));
  el.clearFile.addEventListener("click", () => { el.file.value = ""; setFile(null); });
  el.drop.addEventListener("dragover", (event) => { event.preventDefault(); el.drop.classList.add("over"); });
  el.drop.addEventListener("dragleave", () => el.drop.classList.remove("over"));
  el.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    el.drop.classList.remove("over");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) setFile(file);
  });

  function mediaKind(file, task) {
    const type = file.type || "";
    for (const kind of ["image", "audio", "video"]) if (type.startsWith(kind + "/")) return kind;
    const ext = (file.name.split(".").pop() || "").toLowerCase();
    if (["png", "jpg", "jpeg", "gif", "webp", "bmp", "tif", "tiff"].includes(ext)) return "image";
    if (["wav", "flac", "ogg", "mp3", "m4a", "opus"].includes(ext)) return "audio";
    if (["mp4", "mov", "mkv", "webm", "avi"].includes(ext)) return "video";
    const wanted = TASKS[task].media;
    return wanted && wanted !== "any" ? wanted : "image";
  }

  function settings() {
    const out = {};
    for (const [name, input] of Object.entries(el.settings)) {
      const value = input.value.trim();
      if (value !== "") out[name] = Number(value);
    }
    return out;
  }

  async function buildBody(task) {
    const spec = TASKS[task];
    const text = el.text.value.trim();
    if (spec.text && !text) throw new Error("Please enter the " + spec.text.toLowerCase() + ".");
    if (spec.media && !chosenFile) throw new Error("Please choose or record a file first.");
    let input;
    if (spec.chat) {
      input = { name: text, messages: [{ role: "user", content: text }], mode: "std" };
    } else {
      input = { name: chosenFile && spec.media ? chosenFile.name : text.slice(0, 60), fields: {} };
      for (const field of spec.fields || []) input.fields[field] = text;
      if (spec.media) {
        input.media = [{ kind: mediaKind(chosenFile, task), name: chosenFile.name, data: await fileToBase64(chosenFile) }];
      }
    }
    return { inputs: [input], settings: settings() };
  }

  // ---- messages -------------------------------------------------------------------------------------
  function setStatus(text) { el.status.textContent = text; }

  function showError(message, hint) {
    el.error.replaceChildren(make("strong", {}, "Error: "), document.createTextNode(message || "something went wrong"));
    if (hint) el.error.append(make("p", { class: "hint" }, hint));
    el.error.hidden = false;
  }

  function hideError() { el.error.hidden = true; el.error.replaceChildren(); }

  // ---- results --------------------------------------------------------------------------------------
  const cards = new Map(); // result index → its card

  function card(index) {
    if (!cards.has(index)) {
      const node = make("article", { class: "result" });
      node.append(make("h3", {}, "Result " + (index + 1)));
      node.live = make("div", { class: "parts" });
      node.append(node.live);
      el.results.append(node);
      cards.set(index, node);
    }
    return cards.get(index);
  }

  function download(blob, name, label) {
    return make("a", { href: blobUrl(blob), download: name, class: "download" }, label || "Download " + name);
  }

  function imageNode(b64, name) {
    const blob = new Blob([b64ToBytes(b64)], { type: "image/png" });
    const figure = make("figure");
    const img = make("img", { src: blobUrl(blob), alt: "Generated image " + name });
    figure.append(img, make("figcaption", {}, ""));
    figure.lastChild.append(download(blob, name));
    return figure;
  }

  function audioNode(audio, name) {
    const bytes = b64ToBytes(audio.samples);
    const samples = new Float32Array(bytes.buffer, 0, Math.floor(bytes.byteLength / 4));
    const blob = wavBlob(samples, audio.rate || 16000);
    const box = make("div", { class: "audio" });
    const player = make("audio", { controls: "", src: blobUrl(blob), preload: "auto" });
    player.setAttribute("aria-label", "Generated speech " + name);
    box.append(player, download(blob, name));
    return box;
  }

  function textNode(text, name) {
    const box = make("div", { class: "text" });
    box.append(make("p", { class: "answer" }, text));
    box.append(download(new Blob([text], { type: "text/plain;charset=utf-8" }), name));
    return box;
  }

  function showPart(index, part) {
    const target = card(index).live;
    const n = target.children.length + 1;
    if (part.image) target.append(imageNode(part.image, "part-" + n + ".png"));
    else if (part.audio) target.append(audioNode(part.audio, "part-" + n + ".wav"));
    else if (part.text) target.append(make("p", { class: "answer" }, part.text));
  }

  function showResult(result) {
    const index = typeof result.index === "number" ? result.index : cards.size;
    const node = card(index);
    const base = safeName(result.input || result.task);
    node.firstChild.textContent = (result.input ? result.input : "Result " + (index + 1)) + " — " + result.task;
    const body = make("div", { class: "parts" });
    if (result.error) {
      const problem = make("div", { class: "error", role: "alert" });
      problem.append(make("strong", {}, "Error: "), document.createTextNode(result.error.message || "failed"));
      if (result.error.hint) problem.append(make("p", { class: "hint" }, result.error.hint));
      body.append(problem);
    } else if (result.parts && result.parts.length) {
      // An interleaved story: text and pictures in order; parts name their media by index.
      result.parts.forEach((part) => {
        if (part.kind === "image" && part.ref !== null && result.images[part.ref]) {
          body.append(imageNode(result.images[part.ref], base + "-" + (part.ref + 1) + ".png"));
        } else if (part.kind === "audio" && part.ref !== null && result.audio[part.ref]) {
          body.append(audioNode(result.audio[part.ref], base + "-" + (part.ref + 1) + ".wav"));
        } else if (part.text) {
          body.append(make("p", { class: "answer" }, part.text));
        }
      });
      if (result.text) body.append(download(new Blob([result.text], { type: "text/plain;charset=utf-8" }), base + ".txt", "Download the story text"));
    } else {
      if (result.text) body.append(textNode(result.text, base + ".txt"));
      (result.images || []).forEach((b64, n) => body.append(imageNode(b64, base + (n ? "-" + (n + 1) : "") + ".png")));
      (result.audio || []).forEach((a, n) => body.append(audioNode(a, base + (n ? "-" + (n + 1) : "") + ".wav")));
      if (!result.text && !(result.images || []).length && !(result.audio || []).length) {
        body.append(make("p", { class: "help" }, "(no output)"));
      }
    }
    if (result.problems && result.problems.length) {
      body.append(make("p", { class: "help" }, "Problems: " + result.problems.join("; ")));
    }
    node.live.replaceWith(body);
    node.live = body;
  }

  function handleLine(line) {
    let message;
    try { message = JSON.parse(line); } catch (e) { throw new Error("the server sent a line that is not JSON"); }
    if (message.type === "result") showResult(message.result);
    else if (message.type === "part") showPart(message.index || 0, message.part || {});
    else if (message.type === "error") {
      const err = message.error || {};
      showError(err.message, err.hint);
      return "error";
    }
    return message.type;
  }

  async function readError(response) {
    let message = "HTTP " + response.status + " " + response.statusText, hint = null;
    try {
      const data = await response.json();
      if (data && data.error) { message = data.error.message || message; hint = data.error.hint || null; }
    } catch (e) { /* not JSON */ }
    return { message, hint };
  }

  // ---- running --------------------------------------------------------------------------------------
  function setState(state) {
    el.output.dataset.state = state;
    const running = state === "running";
    el.run.disabled = running;
    el.stop.disabled = !running;
    el.output.setAttribute("aria-busy", running ? "true" : "false");
  }

  async function run(event) {
    event.preventDefault();
    const task = currentTask();
    hideError();
    for (const url of urls) URL.revokeObjectURL(url);
    urls = [];
    cards.clear();
    el.results.replaceChildren();
    let body;
    try {
      body = await buildBody(task);
    } catch (e) {
      showError(e.message);
      setState("error");
      return;
    }
    setState("running");
    setStatus("Running " + task + "… (the first run loads the model)");
    const started = performance.now();
    controller = new AbortController();
    let failed = false, results = 0;
    try {
      const response = await fetch("/v1/run/" + task, {
        method: "POST", body: JSON.stringify(body), signal: controller.signal,
        headers: headers({ "Content-Type": "application/json", Accept: "application/x-ndjson" }),
      });
      if (response.status === 401) {
        failed = true;
        askForKey();
      } else if (!response.ok) {
        failed = true;
        const err = await readError(response);
        showError(err.message, err.hint);
      } else {
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
          let cut;
          while ((cut = buffer.indexOf("\n")) >= 0) {
            const line = buffer.slice(0, cut).trim();
            buffer = buffer.slice(cut + 1);
            if (!line) continue;
            const kind = handleLine(line);
            if (kind === "error") failed = true;
            if (kind === "result") {
              results++;
              setStatus("Received " + results + " result" + (results > 1 ? "s" : "") + "…");
            }
          }
          if (done) break;
        }
        if (buffer.trim() && handleLine(buffer.trim()) === "error") failed = true;
      }
    } catch (e) {
      failed = true;
      if (e.name === "AbortError") showError("Stopped.");
      else showError(e.message, "Is the server still running?");
    }
    controller = null;
    if (el.results.querySelector(".error")) failed = true;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus((failed ? "Finished with an error" : "Done") + " in " + seconds + " s.");
    setState(failed ? "error" : "done");
    refreshHealth();
  }

  el.form.addEventListener("submit", run);
  el.stop.addEventListener("click", () => { if (controller) controller.abort(); });

  // ---- recording: MediaRecorder → decoded by Web Audio → 16 kHz mono 16-bit WAV ------------------------
  let recorder = null;
  async function toWav(blob) {
    const Context = window.AudioContext || window.webkitAudioContext;
    const context = new Context();
    try {
      const decoded = await context.decodeAudioData(await blob.arrayBuffer());
      const rate = 16000;
      const length = Math.max(1, Math.ceil(decoded.duration * rate));
      const offline = new OfflineAudioContext(1, length, rate); // mixes down to mono while resampling
      const source = offline.createBufferSource();
      source.buffer = decoded;
      source.connect(offline.destination);
      source.start();
      const rendered = await offline.startRendering();
      return wavBlob(rendered.getChannelData(0), rate);
    } finally {
      context.close();
    }
  }

  async function toggleRecording() {
    if (recorder) { recorder.stop(); return; }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      el.recordStatus.textContent = "The microphone is not available: " + e.message;
      return;
    }
    const chunks = [];
    recorder = new MediaRecorder(stream);
    recorder.addEventListener("dataavailable", (event) => { if (event.data.size) chunks.push(event.data); });
    recorder.addEventListener("stop", async () => {
      stream.getTracks().forEach((track) => track.stop());
      recorder = null;
      el.record.setAttribute("aria-pressed", "false");
      el.record.textContent = "Record from the microphone";
      el.recordStatus.textContent = "Converting the recording…";
      try {
        const wav = await toWav(new Blob(chunks, { type: chunks[0] ? chunks[0].type : "audio/webm" }));
        el.file.value = "";
        setFile(new File([wav], "recording.wav", { type: "audio/wav" }));
        el.recordStatus.textContent = "Recorded.";
      } catch (e) {
        el.recordStatus.textContent = "Could not convert the recording: " + e.message;
      }
    });
    recorder.start();
    el.record.setAttribute("aria-pressed", "true");
    el.record.textContent = "Stop recording";
    el.recordStatus.textContent = "Recording… press “Stop recording” when done.";
  }

  if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.MediaRecorder &&
      (window.AudioContext || window.webkitAudioContext)) {
    el.record.addEventListener("click", toggleRecording);
  } else {
    el.record.disabled = true;
    el.recordStatus.textContent = "Recording needs a browser with microphone access (and https or localhost).";
  }

  // ---- start ----------------------------------------------------------------------------------------
  try { el.key.value = sessionStorage.getItem(KEY_STORE) || ""; } catch (e) { /* storage off */ }
  updateTask();
  refreshHealth();
})();
