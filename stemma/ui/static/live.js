// The live page: polls this server's Prometheus /metrics and redraws the engines and models tables.
"use strict";
(function () {
  const POLL_MS = 2000;
  let last = null;  // {t: seconds, tokens: {model: completion tokens}} of the previous poll

  // Prometheus text format: "name{label="value",...} number" lines; comments start with "#".
  function parse(text) {
    const out = [];
    for (const line of text.split("\n")) {
      const m = line.match(/^([a-z_]+)(?:\{(.*)\})? ([-+0-9.eE]+|NaN)$/);
      if (!m) continue;
      const labels = {};
      for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
      out.push({name: m[1], labels: labels, value: Number(m[3])});
    }
    return out;
  }

  function fill(tbody, rows, empty, width) {
    const trs = rows.map((cells) => {
      const tr = document.createElement("tr");
      for (const c of cells) {
        const td = document.createElement("td");
        td.textContent = c;
        tr.appendChild(td);
      }
      return tr;
    });
    if (!trs.length) {
      const tr = document.createElement("tr"), td = document.createElement("td");
      td.colSpan = width;
      td.textContent = empty;
      tr.appendChild(td);
      trs.push(tr);
    }
    tbody.replaceChildren(...trs);
  }

  function by(samples, name, key) {
    const out = {};
    for (const s of samples) if (s.name === name) out[s.labels[key]] = s.value;
    return out;
  }

  async function poll() {
    try {
      const response = await fetch("/metrics", {cache: "no-store"});
      const samples = parse(await response.text());
      const now = performance.now() / 1000;
      const get = (name) => by(samples, name, "base");
      const adapters = get("stemma_adapters_loaded"), batch = get("stemma_batch_size"),
            running = get("stemma_running_sequences"), queue = get("stemma_queue_depth"),
            bytes = get("stemma_engine_bytes");
      fill(document.querySelector("#engines tbody"), Object.keys(bytes).sort().map((b) =>
        [b, adapters[b], batch[b], running[b], queue[b], (bytes[b] / 2 ** 20).toFixed(2) + " MiB"]),
        "No engine loaded yet: the first request to a node loads its base.", 6);
      const tokens = by(samples, "stemma_completion_tokens_total", "model");
      const requests = {};
      for (const s of samples) if (s.name === "stemma_requests_total")
        requests[s.labels.model] = (requests[s.labels.model] || 0) + s.value;
      fill(document.querySelector("#models tbody"), Object.keys(requests).sort().map((m) => {
        const rate = last && m in last.tokens ? ((tokens[m] || 0) - last.tokens[m]) / (now - last.t) : null;
        return [m, requests[m], tokens[m] || 0, rate === null ? "-" : rate.toFixed(1)];
      }), "No request served yet.", 4);
      last = {t: now, tokens: tokens};
      document.getElementById("updated").textContent = "Updated " + new Date().toLocaleTimeString() + ".";
    } catch (err) {
      document.getElementById("updated").textContent = "Polling failed: " + err;
    }
  }

  poll();
  setInterval(poll, POLL_MS);
})();
