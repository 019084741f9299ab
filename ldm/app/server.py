"""The HTTP side of the web app: a Flask application serving one static page and a small JSON API.

Routes (every ``/api`` call but the images names its session in the ``X-Session`` header; the page makes one
per browser tab):

* ``GET /`` — the page (``static/index.html``, ``app.js``, ``app.css``; nothing from other hosts: the
  Content-Security-Policy forbids it);
* ``GET /api/choices`` — models, methods (with presets, own options), samplers; ``GET /api/models/<id>`` —
  one model's presets and sizes;
* ``POST /api/generate``, ``POST /api/upscale`` — start a job from a form (400 with the message for bad input);
* ``GET /api/jobs``, ``GET /api/jobs/<id>``, ``POST /api/jobs/<id>/cancel`` — this session's jobs;
* ``GET /api/jobs/<id>/images/<n>.png`` (``/stage<k>.png``) — an image, as the PNG the command line writes
  (with its metadata); ``?download=1`` sends it as an attachment.

Bound to 127.0.0.1 unless ``--listen``; requests naming another host are refused then (DNS rebinding).
"""
import argparse
import logging
import sys
from pathlib import Path

from ldm.errors import UsageError

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_PORT = 7860
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def create_app(runner, allowed_hosts=None):
    """The Flask application around a :class:`ldm.app.jobs.Runner`. ``allowed_hosts``: the Host header values
    accepted (None: any)."""
    from flask import Flask, Response, abort, jsonify, request, send_from_directory

    app = Flask("ldm.app", static_folder=None)
    app.json.sort_keys = False
    catalog = runner.catalog

    @app.before_request
    def check_host():
        if allowed_hosts is not None and request.host not in allowed_hosts:
            abort(403)

    @app.after_request
    def headers(response):
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if request.path.startswith("/api/") and "images" not in request.path:
            response.headers["Cache-Control"] = "no-store"
        return response

    def session():
        sid = request.headers.get("X-Session", "")
        if not 8 <= len(sid) <= 128:
            abort(400, "missing X-Session header")
        return sid

    def usage_error(err):
        return jsonify({"error": str(err)}), 400

    def form():
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise UsageError("the request is not a JSON form")
        return data

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/static/<path:name>")
    def static_file(name):
        return send_from_directory(STATIC, name)

    @app.get("/favicon.ico")
    def favicon():
        return Response(status=204)

    @app.get("/api/choices")
    def choices():
        return jsonify(catalog.static())

    @app.get("/api/models/<path:model_id>")
    def model_choices(model_id):
        try:
            return jsonify(catalog.for_model(model_id))
        except UsageError as err:
            return usage_error(err)

    @app.post("/api/generate")
    def generate():
        sid = session()
        try:
            job = runner.submit_txt2img(sid, form())
        except UsageError as err:
            return usage_error(err)
        return jsonify(job.snapshot())

    @app.post("/api/upscale")
    def upscale():
        sid = session()
        try:
            job = runner.submit_img2img(sid, form())
        except UsageError as err:
            return usage_error(err)
        return jsonify(job.snapshot())

    @app.get("/api/jobs")
    def jobs():
        return jsonify([j.snapshot() for j in runner.jobs_of(session())])

    @app.get("/api/jobs/<job_id>")
    def job(job_id):
        try:
            return jsonify(runner.job(session(), job_id).snapshot())
        except KeyError:
            abort(404)

    @app.post("/api/jobs/<job_id>/cancel")
    def cancel(job_id):
        try:
            return jsonify(runner.cancel(session(), job_id).snapshot())
        except KeyError:
            abort(404)

    def image_response(job_id, n, stage=None):
        try:
            result = runner.job_by_id(job_id).results[n]
            data = result.png if stage is None else result.stages[stage - 1]
        except (KeyError, IndexError):
            abort(404)
        name = f"{job_id[:8]}-{n:02d}" + (f"-stage{stage}" if stage else "") + ".png"
        disposition = "attachment" if request.args.get("download") else "inline"
        return Response(data, mimetype="image/png", headers={
            "Content-Disposition": f'{disposition}; filename="{name}"', "Cache-Control": "private, max-age=3600"})

    @app.get("/api/jobs/<job_id>/images/<int:n>.png")
    def image(job_id, n):
        return image_response(job_id, n)

    @app.get("/api/jobs/<job_id>/images/<int:n>/stage<int:k>.png")
    def stage_image(job_id, n, k):
        if k < 1:
            abort(404)
        return image_response(job_id, n, k)

    return app


def build_parser():
    p = argparse.ArgumentParser(description="The web app: sample with any model, method and sampler of this "
                                "repository from a browser page (README, section 'Web app').")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="the port (0: any free port)")
    p.add_argument("--listen", action="store_true",
                   help="bind 0.0.0.0: anyone who can reach this machine can use the app (no login)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run")
    p.add_argument("--checkpoints", default=None, help="the folder searched for checkpoints (default: checkpoints/)")
    p.add_argument("--model", action="append", default=[], metavar="CONFIG=CKPT",
                   help="also offer this config and checkpoint (repeatable)")
    p.add_argument("--cache_models", type=int, default=2, help="models kept loaded (least recently used dropped)")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    return p


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def host_of(opt):
    return "0.0.0.0" if opt.listen else opt.host


def make_server(opt, log=sys.stderr):
    """(werkzeug server, runner) of the parsed options; the server is bound, not yet serving."""
    from werkzeug.serving import make_server as werkzeug_server

    from ldm.app.choices import Catalog
    from ldm.app.jobs import ModelCache, Runner
    extra = []
    for pair in opt.model:
        if "=" not in pair:
            raise UsageError(f"--model {pair}: give CONFIG=CKPT")
        config, ckpt = pair.split("=", 1)
        for what, path in (("config", config), ("checkpoint", ckpt)):
            if not Path(path).is_file():
                raise UsageError(f"--model {pair}: the {what} {path} does not exist")
        extra.append((config, ckpt))
    if opt.checkpoints and not Path(opt.checkpoints).is_dir():
        raise UsageError(f"--checkpoints {opt.checkpoints}: no such folder")
    if opt.cache_models < 1:
        raise UsageError(f"--cache_models {opt.cache_models}: keep at least 1 model")
    catalog = Catalog(checkpoints=opt.checkpoints, extra=extra)
    if not catalog.models:
        raise UsageError("no model found: put checkpoints under checkpoints/ (see checkpoints/README.md) or give "
                         "--model CONFIG=CKPT")
    runner = Runner(catalog, device=opt.device, cache=ModelCache(capacity=opt.cache_models), log=log)
    server = werkzeug_server(host_of(opt), opt.port, None, threaded=True)  # the app is set once the port is known
    port = server.server_port
    local = host_of(opt) in LOOPBACK
    allowed = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"} if local else None
    server.app = create_app(runner, allowed_hosts=allowed)
    logging.getLogger("werkzeug").setLevel(logging.INFO if opt.verbose else logging.WARNING)
    return server, runner


def startup_messages(opt, server, runner):
    """The lines printed when the server starts: notes on checkpoints left out, the --listen warning, the URL."""
    lines = [f"note: {note}" for note in runner.catalog.notes]
    if host_of(opt) not in LOOPBACK:
        how = "--listen" if opt.listen else f"--host {opt.host}"
        lines.append(f"warning: {how}: the app is reachable from other machines on port "
                     f"{server.server_port}; there is no login, so anyone who can reach it can run models on this "
                     "machine and see the images (use only on a network you trust)")
    host = "127.0.0.1" if host_of(opt) in ("0.0.0.0", "::") else host_of(opt)
    lines.append(f"Web app: http://{host}:{server.server_port}/  (models: "
                 f"{', '.join(m.id for m in runner.catalog.models)}; Ctrl-C stops it)")
    return lines


def main(argv=None):
    opt = build_parser().parse_args(argv)
    try:
        server, runner = make_server(opt)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot listen on {opt.host}:{opt.port}: {err.strerror or err} (try another --port)",
              file=sys.stderr)
        return 2
    for line in startup_messages(opt, server, runner):
        print(line, file=sys.stdout if line.startswith("Web app") else sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
