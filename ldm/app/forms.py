"""A submitted form as the pipelines' command-line arguments, parsed by the pipelines' own parsers.

Every value is passed as text to the parser that ``scripts/txt2img.py`` / ``scripts/upscale.py`` use, so the
app accepts and refuses exactly what the command lines do; a parser error is a :class:`UsageError` with
argparse's text (which names the flag) instead of an exit. Empty fields are left out (the pipeline's default).
The page may only name models and presets the catalog lists: no file path reaches the pipelines from the browser
except in a method's own path options (e.g. FreeScale's ``--detail_mask``), as on the command line.
"""
from ldm import methods
from ldm.errors import UsageError

# form field -> txt2img flag (the shared settings; a method's own options come from its argument group)
TXT2IMG_FIELDS = (("prompt", "--prompt"), ("negative_prompt", "--negative_prompt"), ("H", "--H"), ("W", "--W"),
                  ("steps", "--steps"), ("scale", "--scale"), ("seed", "--seed"), ("batch", "--n_samples"))
IMG2IMG_FIELDS = (("prompt", "--prompt"), ("negative_prompt", "--negative_prompt"), ("H", "--H"), ("W", "--W"),
                  ("factor", "--scale"), ("strength", "--strength"), ("steps", "--steps"),
                  ("scale", "--scale_cfg"), ("seed", "--seed"), ("batch", "--n_samples"))
TEXT_FIELDS = {"prompt", "negative_prompt"}  # kept as typed (an empty prompt is a prompt)
MAX_BATCH = 16


def raising(parser):
    """The parser, with errors raised as UsageError instead of printed with an exit (status 2)."""
    def error(message):
        raise UsageError(message)
    parser.error = error
    return parser


def text(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else ""
    return str(value).strip()


def field_args(form, fields):
    argv = []
    for key, flag in fields:
        value = form.get(key)
        if key in TEXT_FIELDS:
            if value is not None:
                argv += [flag, str(value)]
            continue
        value = text(value)
        if value:
            argv += [flag, value]
    return argv


def method_args(form, cls, catalog, model, img2img=False):
    """The method's preset and own options from the form (``preset``, ``options``: {dest: value})."""
    argv = []
    preset = text(form.get("preset"))
    if preset:
        if not cls.preset_flag:
            raise UsageError(f"{cls.label or cls.name} takes no preset (got {preset})")
        offered = {p["path"] for p in catalog.for_model(model.id)["presets"][cls.name]}
        if preset not in offered:
            raise UsageError(f"{cls.preset_flag} {preset}: not one of the {cls.label} presets for {model.id} "
                             f"({', '.join(sorted(offered)) or 'none'})")
        argv += [cls.preset_flag, str(catalog.root / preset)]
    from ldm.app.choices import method_options
    known = {o["dest"]: o for o in method_options(cls)}
    refused = cls.img2img_refused if img2img else {}
    for dest, value in (form.get("options") or {}).items():
        if dest not in known:
            raise UsageError(f"{dest}: not an option of {cls.label or cls.name} (its options: "
                             f"{', '.join(o['flag'] for o in known.values()) or 'none'})")
        o = known[dest]
        if o["kind"] == "toggle":
            if value is None or value == "" or bool(value) == bool(o["default"]):
                continue
            argv.append(o["flag"] if value else "--no-" + o["flag"][2:])
        elif o["kind"] == "flag":
            if value and value != "false":
                argv.append(o["flag"])
        else:
            value = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else text(value)
            if not value:
                continue
            argv += [o["flag"], *(value.replace(",", " ").split() if o["kind"] == "list" else [value])]
        if dest in refused:
            raise UsageError(f"{o['flag']}: {refused[dest]} (upscaling with {cls.name})")
    return argv


def method_of(form, allowed):
    name = text(form.get("method")) or "direct"
    if name not in allowed:
        raise UsageError(f"method {name!r}: not one of {', '.join(allowed)}")
    return methods.method_class(name)


def check_batch(form):
    batch = text(form.get("batch"))
    if batch.isdigit() and int(batch) > MAX_BATCH:
        raise UsageError(f"batch {batch}: at most {MAX_BATCH} images per run in the app (scripts/txt2img.py "
                         "takes more)")


def sampler_args(form, img2img=False):
    """``--sampler NAME`` where the pipeline has that option (else only ddim, what it runs), with the form's eta as
    the sampler takes it: --ddim_eta for ddim, --eta for the samplers that draw noise, none for the others."""
    from ldm.app.choices import sampler_flag
    from ldm.samplers import SAMPLERS
    name = text(form.get("sampler")) or next(iter(SAMPLERS))
    if name not in SAMPLERS:
        raise UsageError(f"sampler {name!r}: not one of {', '.join(SAMPLERS)}")
    flag = sampler_flag()
    if flag and img2img:
        from ldm.pipelines.upscale import img2img_options
        accepted = img2img_options()
        flag = flag if flag.lstrip("-") in accepted and accepted[flag.lstrip("-")] is None else None
    eta = text(form.get("eta"))
    if name == "ddim":
        eta_args = ["--ddim_eta", eta] if eta else []
    else:
        from ldm.samplers import sampler_class
        eta_args = ["--eta", eta] if eta and sampler_class(name).stochastic else []
    if flag:
        return [flag, name] + eta_args
    if name != "ddim":
        raise UsageError(f"sampler {name}: the {'img2img' if img2img else 'txt2img'} pipeline samples with ddim only "
                         "(it has no --sampler option)")
    return eta_args


def txt2img_argv(form, catalog, device="auto"):
    """The scripts/txt2img.py arguments of a generation form."""
    model = catalog.model(text(form.get("model")) or catalog.models[0].id)
    cls = method_of(form, methods.names())
    check_batch(form)
    argv = ["--config", str(model.config), "--ckpt", str(model.ckpt), "--device", device, "--method", cls.name]
    argv += field_args(form, TXT2IMG_FIELDS) + sampler_args(form) + method_args(form, cls, catalog, model)
    if form.get("save_stages") and "save_stages" in cls.accepts:
        argv.append("--save_stages")
    return model, argv


def parse_txt2img(form, catalog, device="auto"):
    """(model, argv, opt) of a generation form; UsageError for anything the command line refuses."""
    from ldm.pipelines.txt2img import build_parser
    model, argv = txt2img_argv(form, catalog, device)
    return model, argv, raising(build_parser()).parse_args(argv)


def img2img_argv(form, catalog, model, image_path, device="auto"):
    """The scripts/upscale.py arguments of an upscale form (the image: a file the app wrote)."""
    cls = method_of(form, methods.img2img_names())
    check_batch(form)
    argv = ["--method", cls.name, "--image", str(image_path), "--config", str(model.config), "--ckpt",
            str(model.ckpt), "--device", device]
    argv += field_args(form, IMG2IMG_FIELDS) + sampler_args(form, True) + method_args(form, cls, catalog, model, True)
    return argv


def parse_img2img(form, catalog, model, image_path, device="auto"):
    """(argv, opt, parser) of an upscale form."""
    from ldm.pipelines.upscale import build_img2img_parser
    argv = img2img_argv(form, catalog, model, image_path, device)
    parser = raising(build_img2img_parser())
    return argv, parser.parse_args(argv), parser
