"""GET /status: one self-contained HTML page (no CDN, works offline) polling /status.json."""

STATUS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Embedding &amp; reranker gateway status</title>
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
 h1{font-size:20px;margin:0 0 4px} .sub{color:#666;margin-bottom:16px}
 table{border-collapse:collapse;margin:8px 0 24px;background:#fff;min-width:720px}
 th,td{border:1px solid #ddd;padding:6px 10px;text-align:left} th{background:#f0f0f0}
 .ok{color:#0a7d22;font-weight:600} .bad{color:#c0182b;font-weight:600} .warn{color:#b26b00;font-weight:600}
 .num{text-align:right;font-variant-numeric:tabular-nums}
</style></head>
<body>
<h1>Embedding &amp; reranker gateway</h1>
<div class="sub">status: <span id="overall">loading…</span> · in flight <span id="inflight">-</span>
 · queued <span id="queued">-</span> · limits in <span id="storage">-</span> · updated <span id="updated">-</span></div>
<div id="models"></div>
<script>
const q = new URLSearchParams(location.search);
const key = q.get("api_key");
const url = "status.json" + (key ? "?api_key=" + encodeURIComponent(key) : "");
function cls(s){return s==="healthy"?"ok":s==="degraded"?"warn":"bad"}
function esc(s){return String(s==null?"-":s).replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]))}
async function refresh(){
  try{
    const r = await fetch(url, {cache:"no-store"});
    const d = await r.json();
    if(!r.ok){document.getElementById("overall").textContent = d.error ? d.error.message : r.status; return;}
    const o = document.getElementById("overall");
    o.textContent = d.status; o.className = cls(d.status);
    document.getElementById("inflight").textContent = d.in_flight + " / " + d.max_concurrency;
    document.getElementById("queued").textContent = d.queued;
    document.getElementById("storage").textContent = d.ratelimit_storage;
    document.getElementById("updated").textContent = new Date(d.time*1000).toLocaleTimeString();
    let html = "";
    for (const [name, m] of Object.entries(d.models)){
      const t = m.traffic || {};
      html += `<h2>${esc(name)} <small>(${esc(m.kind)})</small></h2>`;
      html += `<table><tr><th>requests/s (1 min)</th><th>p50 ms</th><th>p95 ms</th><th>error rate</th><th>rate-limited</th></tr>`;
      html += `<tr><td class="num">${esc(t.rps??0)}</td><td class="num">${esc(t.p50_ms)}</td><td class="num">${esc(t.p95_ms)}</td>`+
              `<td class="num">${t.error_rate!=null?(t.error_rate*100).toFixed(2)+" %":"-"}</td><td class="num">${esc(t.rate_limited??0)}</td></tr></table>`;
      html += `<table><tr><th>replica</th><th>health</th><th>latency ms</th><th>in flight</th><th>requests</th><th>last error</th></tr>`;
      for (const rep of m.replicas){
        html += `<tr><td>${esc(rep.url ?? ("replica " + rep.replica))}</td><td class="${rep.healthy?"ok":"bad"}">${rep.healthy?"up":"down"}</td>`+
                `<td class="num">${esc(rep.latency_ms)}</td><td class="num">${esc(rep.outstanding)}</td>`+
                `<td class="num">${esc(rep.requests)}</td><td>${esc(rep.last_error)}</td></tr>`;
      }
      html += `</table>`;
    }
    document.getElementById("models").innerHTML = html;
  }catch(e){ document.getElementById("overall").textContent = "gateway unreachable"; }
}
refresh(); setInterval(refresh, 2000);
</script>
</body></html>
"""
