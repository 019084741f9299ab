"""The web app (``scripts/app.py``): a page to sample with any model, method and sampler of the registries.

Layers: ``choices`` (what the page offers: models found under ``checkpoints/``, the method registry's methods,
presets and own options, the sampler registry, size presets), ``forms`` (a submitted form as the pipelines'
command-line arguments, checked), ``jobs`` (runs in background threads: progress, cancellation, the locked model
cache, per-session job tables), ``server`` (the Flask routes and the static page in ``static/``).

Generation goes through the pipelines (``ldm.pipelines.txt2img.generate``, ``ldm.pipelines.upscale
.generate_img2img``): the app's images are the command line's for the same arguments.
"""
