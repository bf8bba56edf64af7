"""A local web page to try a trained model: drop an image, choose classes, see the result.

  python -m larvseg_jax.demo --workdir runs/larvseg [--port 8000] [--max-upload-mb 20]

Then open http://127.0.0.1:8000. One page (no framework: the standard library's http.server and
a little JavaScript) posts the image to /api/segment, which runs `inference.Predictor.segment`
and answers with the overlay, its legend, the per-class pixel fractions and, for a LarvSeg model,
the CA-classifier's attention map of a chosen class. Files that are not images, or larger than
--max-upload-mb, are refused with a message on the page. It listens on 127.0.0.1 only.
"""

import argparse
import base64
import email.parser
import email.policy
import html
import http.server
import io
import json
import sys
import threading

import numpy as np
from PIL import Image

from larvseg_jax import ca_visualize, visualize
from larvseg_jax.errors import UserError
from larvseg_jax.inference import ImageError, Predictor, load, read_rgb
from larvseg_jax.segment import add_model_flags, overlay, summary

DISCARD_LIMIT = 1 << 30  # bytes of a refused upload read and dropped before answering


class RequestError(Exception):
    """A refused request: HTTP status and a message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _png_data_url(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def parse_form(content_type: str, body: bytes) -> dict[str, bytes]:
    """multipart/form-data -> {field name: raw bytes} (the standard library's email parser)."""
    if not content_type.startswith("multipart/form-data"):
        raise RequestError(400, "send the image as multipart/form-data (the page's form does)")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = part.get_payload(decode=True) or b""
    return fields


class Demo:
    """The model and what one request needs (shared by the server's threads)."""

    def __init__(self, predictor: Predictor, max_upload_bytes: int):
        self.predictor = predictor
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()  # one prediction at a time: the device is the bottleneck

    def segment(self, fields: dict[str, bytes]) -> dict:
        image = fields.get("image", b"")
        if not image:
            raise RequestError(400, "choose an image file first")
        try:
            rgb = read_rgb(image)
        except ImageError as e:
            raise RequestError(400, f"that file is {e}; upload a JPEG, PNG, GIF, BMP, TIFF or WebP")
        p = self.predictor
        text = fields.get("classes", b"").decode(errors="replace").strip()
        try:
            names = p.resolve(text.split(","), "classes") if text else p.default_names
            attention = fields.get("attention", b"").decode(errors="replace").strip()
            if attention:
                (attention,) = p.resolve([attention], "attention class")
                if attention not in names:
                    raise UserError(f"attention class {attention!r} is not among the classes")
        except UserError as e:
            raise RequestError(400, str(e)) from None
        index, colours = p.index(names), visualize.palette(names)
        with self._lock:
            pred = p.segment(rgb, index)
            att = p.attention(rgb, index, names.index(attention)) if attention else None
        rows = summary(pred.labels, pred.confidence, names)
        for row in rows:
            row["colour"] = "#" + "".join(f"{int(c):02x}" for c in colours[row["id"]])
        answer = {
            "size": list(rgb.shape[:2]),
            "num_classes": len(names),
            "classes": rows,
            "overlay": _png_data_url(overlay(rgb, pred.labels, names, colours)),
            "attention": None,
        }
        if att is not None:
            heat = ca_visualize.heat(att).astype(np.float32)
            picture = (0.4 * rgb.astype(np.float32) + 0.6 * heat).round().astype(np.uint8)
            answer["attention"] = _png_data_url(picture)
            answer["attention_class"] = attention
        return answer

    def page(self) -> str:
        p = self.predictor
        options = "".join(f'<option value="{html.escape(n)}">' for n in p.union)
        return PAGE.format(
            title=html.escape(f"LarvSeg-JAX: {p.checkpoint}"),
            checkpoint=html.escape(p.checkpoint),
            num_union=len(p.union),
            default=html.escape(", ".join(p.default_names[:12]))
            + (", ..." if len(p.default_names) > 12 else ""),
            options=options,
            max_mb=f"{self.max_upload_bytes / 1e6:g}",
            max_bytes=self.max_upload_bytes,
            has_bank="true" if p.bank is not None else "false",
        )


def make_handler(demo: Demo):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # one quiet line per request
            sys.stderr.write(
                f"demo: {self.command} {self.path} {args[1] if len(args) > 1 else ''}\n"
            )

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _discard(self, length: int) -> None:
            """Reads and drops a refused body (a client still sending it would otherwise see
            a broken connection instead of the message); past DISCARD_LIMIT, hangs up."""
            if length > DISCARD_LIMIT:
                self.close_connection = True
                return
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 20))
                if not chunk:
                    break
                length -= len(chunk)

        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self._send(200, demo.page().encode(), "text/html; charset=utf-8")
            else:
                self._send(404, b"not found", "text/plain")

        def do_POST(self):
            try:
                if self.path != "/api/segment":
                    raise RequestError(404, "not found")
                length = int(self.headers.get("Content-Length") or 0)
                if length > demo.max_upload_bytes:
                    self._discard(length)
                    raise RequestError(
                        413,
                        f"that file is {length / 1e6:.1f} MB; this demo takes up to "
                        f"{demo.max_upload_bytes / 1e6:g} MB (--max-upload-mb)",
                    )
                fields = parse_form(self.headers.get("Content-Type", ""), self.rfile.read(length))
                body, status = demo.segment(fields), 200
            except RequestError as e:
                body, status = {"error": str(e)}, e.status
            self._send(status, json.dumps(body).encode(), "application/json")

    return Handler


def serve(demo: Demo, port: int) -> http.server.ThreadingHTTPServer:
    """A server on 127.0.0.1:`port` (0 = any free port); call serve_forever() on it."""
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), make_handler(demo))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m larvseg_jax.demo", description="A local web page to try a model."
    )
    add_model_flags(parser)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-upload-mb", type=float, default=20.0)
    args = parser.parse_args(argv)
    try:
        predictor = load(args.workdir, step=args.step, checkpoint=args.checkpoint)
        server = serve(Demo(predictor, int(args.max_upload_mb * 1e6)), args.port)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: cannot listen on 127.0.0.1:{args.port} ({e.strerror}): try --port")
    print(f"LarvSeg-JAX demo of {predictor.checkpoint} on http://127.0.0.1:{server.server_port}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("demo stopped")
    finally:
        server.server_close()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
 body {{ font: 15px system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }}
 #drop {{ border: 2px dashed #888; border-radius: 8px; padding: 18px; text-align: center; }}
 #drop.over {{ background: #eef; }}
 form > * {{ margin: 6px 0; }} input[type=text] {{ width: 100%; padding: 6px; box-sizing: border-box; }}
 #message {{ color: #b00; min-height: 1.2em; }}
 #result img {{ max-width: 100%; border: 1px solid #ccc; }}
 #legend {{ list-style: none; padding: 0; columns: 3; }}
 #legend li {{ margin: 2px 0; }} .swatch {{ display: inline-block; width: 14px; height: 14px;
   vertical-align: middle; margin-right: 6px; border: 1px solid #555; }}
 .muted {{ color: #666; }}
</style></head>
<body>
<h1>LarvSeg-JAX</h1>
<p class="muted">Model: {checkpoint} ({num_union} trained classes). Default classes: {default}</p>
<form id="form">
 <div id="drop">Drop an image here or <input type="file" id="file" name="image" accept="image/*">
  <div class="muted">up to {max_mb} MB</div></div>
 <label>Classes (comma-separated; empty = the default list)
  <input type="text" id="classes" name="classes" list="known" placeholder="boat, water, sky"></label>
 <datalist id="known">{options}</datalist>
 <label id="attention-row">Attention map of class <input type="text" id="attention"
  name="attention" list="known" style="width: 200px"></label>
 <button type="submit" id="submit">Segment</button>
</form>
<p id="message" role="alert"></p>
<div id="result" hidden>
 <p><button type="button" id="toggle" hidden>Show attention map</button></p>
 <img id="overlay" alt="prediction overlay"><img id="attention-map" alt="attention map" hidden>
 <ul id="legend"></ul>
</div>
<script>
const MAX = {max_bytes}, HAS_BANK = {has_bank};
const form = document.getElementById("form"), file = document.getElementById("file");
const message = document.getElementById("message"), drop = document.getElementById("drop");
if (!HAS_BANK) document.getElementById("attention-row").hidden = true;
drop.addEventListener("dragover", e => {{ e.preventDefault(); drop.classList.add("over"); }});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {{
  e.preventDefault(); drop.classList.remove("over"); file.files = e.dataTransfer.files;
}});
document.getElementById("toggle").addEventListener("click", e => {{
  const att = document.getElementById("attention-map"), ov = document.getElementById("overlay");
  att.hidden = !att.hidden; ov.hidden = !att.hidden;
  e.target.textContent = att.hidden ? "Show attention map" : "Show prediction";
}});
form.addEventListener("submit", async e => {{
  e.preventDefault(); message.textContent = "";
  const f = file.files[0];
  if (!f) {{ message.textContent = "choose an image file first"; return; }}
  if (f.size > MAX) {{
    message.textContent = `that file is ${{(f.size / 1e6).toFixed(1)}} MB; this demo takes up to {max_mb} MB`;
    return;
  }}
  document.getElementById("submit").disabled = true; message.textContent = "segmenting...";
  try {{
    const response = await fetch("/api/segment", {{method: "POST", body: new FormData(form)}});
    const answer = await response.json();
    if (answer.error) {{ message.textContent = answer.error; return; }}
    message.textContent = "";
    document.getElementById("overlay").src = answer.overlay;
    document.getElementById("overlay").hidden = false;
    const att = document.getElementById("attention-map"), toggle = document.getElementById("toggle");
    att.hidden = true; toggle.hidden = !answer.attention; toggle.textContent = "Show attention map";
    if (answer.attention) att.src = answer.attention;
    const legend = document.getElementById("legend"); legend.innerHTML = "";
    for (const c of answer.classes) {{
      const li = document.createElement("li"), sw = document.createElement("span");
      sw.className = "swatch"; sw.style.background = c.colour;
      li.append(sw, `${{c.name}} ${{(100 * c.fraction).toFixed(1)}}%`);
      li.dataset.name = c.name; legend.append(li);
    }}
    document.getElementById("result").hidden = false;
  }} catch (err) {{ message.textContent = "the server did not answer: " + err; }}
  finally {{ document.getElementById("submit").disabled = false; }}
}});
</script>
</body></html>
"""


if __name__ == "__main__":
    main()
