"""What the benchmarks, the table runner and the evaluation reports share: the machine a figure was measured on, and
writing a generated block into a markdown file between markers (the rest of the file is left as it is)."""
import os
import platform
import tempfile
from pathlib import Path


def cpu_name():
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description(device="cpu", threads=None, extra=""):
    """One line naming the device a figure was measured on: the GPU (count, torch, CUDA) or the CPU (model, cores,
    RAM, torch threads); ``extra`` is appended (e.g. the precision)."""
    import torch
    if str(device).startswith("cuda") and torch.cuda.is_available():
        text = (f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    else:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
        threads = torch.get_num_threads() if threads is None else threads
        text = (f"{cpu_name()}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, torch {torch.__version__}, "
                f"{threads} thread(s)")
    return f"{text}, {extra}" if extra else text


def replace_block(path, kind, name, body, heading=""):
    """Write ``body`` between ``<!-- KIND:NAME -->`` and ``<!-- /KIND:NAME -->`` in the markdown file ``path``
    (appended if absent; a new file starts with ``heading``), atomically."""
    path = Path(path)
    start, end = f"<!-- {kind}:{name} -->", f"<!-- /{kind}:{name} -->"
    text = path.read_text(encoding="utf-8") if path.is_file() else heading
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        i, j = text.index(start), text.index(end) + len(end)
        text = text[:i] + block + text[j:]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
