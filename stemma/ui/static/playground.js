// The playground: one streamed completion from this server's /v1/completions (the OpenAI API), read chunk by
// chunk from the response body. Shows the text as it arrives, the version that answered and its tokens/s.
"use strict";
(function () {
  const form = document.getElementById("playground");
  const output = document.getElementById("output");
  const answered = document.getElementById("answered");
  const error = document.getElementById("error");
  const run = document.getElementById("run");

  function body() {
    const f = new FormData(form);
    const doc = {model: f.get("model"), prompt: f.get("prompt"), stream: true,
                 stream_options: {include_usage: true},
                 max_tokens: parseInt(f.get("max_tokens"), 10) || 16,
                 temperature: parseFloat(f.get("temperature")) || 0};
    if (doc.model === "auto") {
      for (const k of ["language", "domain"]) if (f.get(k)) doc[k] = f.get(k);
      if (f.get("memory_bytes")) doc.memory_bytes = parseInt(f.get("memory_bytes"), 10);
      if (f.get("latency_ms")) doc.latency_ms = parseFloat(f.get("latency_ms"));
    }
    return doc;
  }

  // "answered by NODE@VERSION" (a link to the node page at that version), then what else is known.
  function show(model, version, extra) {
    const link = document.createElement("a");
    link.href = "/node/" + model + "?version=" + encodeURIComponent(version);
    link.textContent = model + "@" + version;
    answered.replaceChildren("answered by ", link, extra);
    answered.dataset.version = version;
  }

  function fail(message) {
    error.textContent = message;
    error.hidden = false;
  }

  // Server-sent events: "data: {...}" lines separated by blank lines; "data: [DONE]" ends the stream.
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (line.startsWith("data: ") && line !== "data: [DONE]") yield JSON.parse(line.slice(6));
      }
    }
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    output.textContent = "";
    output.dataset.chunks = "0";
    answered.textContent = "waiting for the server...";
    error.hidden = true;
    run.disabled = true;
    const start = performance.now();
    try {
      const response = await fetch("/v1/completions", {method: "POST", body: JSON.stringify(body()),
                                                       headers: {"Content-Type": "application/json"}});
      if (!response.ok) {
        const doc = await response.json().catch(() => ({}));
        answered.textContent = "";
        fail((doc.error && doc.error.message) || response.status + " " + response.statusText);
        return;
      }
      let model = "", version = "", tokens = 0;
      for await (const chunk of events(response)) {
        if (chunk.error) { fail(chunk.error.message); continue; }
        model = chunk.model; version = chunk.system_fingerprint;
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        for (const c of chunk.choices) {
          if (c.text) {
            output.textContent += c.text;
            output.dataset.chunks = String(Number(output.dataset.chunks) + 1);
          }
        }
        show(model, version, "");
      }
      const seconds = (performance.now() - start) / 1000;
      if (version) show(model, version, " · " + tokens + " tokens in " + seconds.toFixed(2) + " s · " +
           (tokens / seconds).toFixed(1) + " tokens/s");
    } catch (err) {
      fail(String(err));
    } finally {
      run.disabled = false;
    }
  });
})();
