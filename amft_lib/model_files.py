"""Model directories are data, never code: the checks every stage runs before transformers sees one.

Why these checks exist (issue 21): a Hugging Face directory can name Python to run (`auto_map` in
config.json and friends; transformers asks on stdin and `yes |` answers), can hold pickle weights
(`pytorch_model.bin`), a safetensors header that claims terabytes, a config.json whose sizes do not
match its weights (transformers allocates from the config first), a tokenizer with more ids than the
embedding has rows (an IndexError mid-run), a chat template that loops forever or renders gigabytes,
and symlinks to files outside the directory (or to /dev/zero) that a copy or upload follows.
Every check here reads only bounded JSON and the safetensors headers, names the file and the key,
and raises :class:`ModelFilesError` (a UserError: one `error:` line at the CLI). Nothing here
imports torch at module level; the architecture check builds the model on the `meta` device
(shapes only, no memory).

Entry points:
- `check_files(root)`: layout (no symlink leaving the folder, no FIFO/device) and no custom-code
  reference in any config; cheap, for every resolved source.
- `check_model_dir(root)`: everything (weights, config match, tokenizer fit, chat templates); before
  any `from_pretrained`.
- `check_no_code(root)`: the registry refuses a folder that ships code files.
- `content_digest(root)`: one sha256 over what the model computes (weights, config, tokenizer), not
  over a folder listing, so a cache file next to the weights does not make a model "new".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amft_lib.errors import UserError


class ModelFilesError(UserError, ValueError):
    """A model directory that must not be loaded; the message names the file and key."""


# ── limits ──────────────────────────────────────────────────────────────────────────────────────
MAX_JSON_BYTES = 64 << 20  # a config or tokenizer JSON larger than this is not a config (tokenizer.json ~ 10 MB)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own reader refuses larger headers (safetensors/src/tensor.rs)
TEMPLATE_SECONDS = 5.0  # CPU and wall seconds a chat template gets for one sample conversation
TEMPLATE_MAX_OUTPUT = 1 << 20  # bytes of rendered text for that conversation (real templates: < 2 KB)
TEMPLATE_MAX_MEMORY = 512 << 20  # extra address space the rendering child may allocate

# Files transformers (or a processor) reads as configuration, where `auto_map` would name code.
CONFIG_FILES = (
    "config.json", "tokenizer_config.json", "generation_config.json", "processor_config.json",
    "preprocessor_config.json", "feature_extractor_config.json", "image_processor_config.json",
    "video_preprocessor_config.json", "chat_template.json", "adapter_config.json",
)
# Keys that make transformers import a module from the directory (or the hub) when trust_remote_code is on.
CODE_KEYS = ("auto_map", "custom_pipelines")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")  # torch.save / pickle formats
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll", ".sh", ".ipynb", ".pth")
# What the model *is*: the identity digest covers these and nothing else (caches, READMEs, MLflow files).
CONTENT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json",
)
# Fields a re-save rewrites without changing the model: the library version that wrote the file, and the
# load-time arguments transformers copies into tokenizer_config.json (a registry round trip adds
# `is_local` and `local_files_only`).
VOLATILE_KEYS = ("transformers_version", "_name_or_path", "name_or_path", "_commit_hash", "is_local",
                 "local_files_only", "cache_dir", "revision", "subfolder", "token", "force_download",
                 "trust_remote_code")
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings)\.weight$")
_LM_HEAD = re.compile(r"(^|\.)lm_head\.weight$")
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


# ── layout ──────────────────────────────────────────────────────────────────────────────────────


def regular_files(root: str | os.PathLike[str], link_root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Every file under `root`, refusing what a copy or an upload must never read.

    A symlink is accepted only if it resolves to a regular file inside `link_root` (default `root`;
    the hub cache passes its own root, where snapshots link to blobs); one leaving it (a host file,
    /dev/zero) is refused, and so is any FIFO, socket or device. Walks without following links."""
    base = Path(root)
    if not base.is_dir():
        raise ModelFilesError(f"{base}: not a directory")
    inside = Path(link_root or base).resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                target = path.resolve()
                if not target.is_relative_to(inside):
                    raise ModelFilesError(f"{path}: symlink to {target}, outside the model directory; copy the file in")
                if name in dirnames:  # a linked folder would be walked twice or escape later: refuse it
                    raise ModelFilesError(f"{path}: symlink to a folder; model directories hold plain files")
                if not target.is_file():
                    raise ModelFilesError(f"{path}: symlink to {target}, which is not a regular file")
                found.append(path)
            elif stat.S_ISDIR(mode):
                continue
            elif not stat.S_ISREG(mode):
                raise ModelFilesError(f"{path}: not a regular file (FIFO, socket or device); refusing to read it")
            else:
                found.append(path)
    return sorted(found)


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file read with a size bound; one-line errors naming the file."""
    size = path.stat().st_size
    if size > limit:
        raise ModelFilesError(f"{path}: {size} bytes, more than the {limit} a model's JSON file may have")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFilesError(f"{path}: not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    except RecursionError:
        raise ModelFilesError(f"{path}: JSON nested too deeply") from None


def code_key(obj: Any, trail: str = "") -> str | None:
    """The dotted path of the first custom-code key in a parsed JSON value (nested configs included)."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            here = f"{trail}.{key}" if trail else str(key)
            if key in CODE_KEYS:
                return here
            found = code_key(value, here)
            if found:
                return found
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found = code_key(value, f"{trail}[{i}]")
            if found:
                return found
    return None


def check_no_remote_code(root: str | os.PathLike[str], files: Iterable[Path] | None = None) -> None:
    """Refuse any configuration file that names custom code (`auto_map`, `custom_pipelines`).

    Why refuse rather than rely on trust_remote_code=False alone: the refusal is one line naming
    the file and key, it comes before transformers is imported, and it also covers config files
    that a processor or a later transformers version would read."""
    base = Path(root)
    for path in files if files is not None else regular_files(base):
        if path.name not in CONFIG_FILES:
            continue
        refuse_code(str(path), read_json(path))


def refuse_code(where: str, data: Any) -> None:
    """Raise naming `where` and the key when the parsed config `data` references custom code."""
    key = code_key(data)
    if key:
        raise ModelFilesError(
            f"{where}: key '{key}' names custom code that transformers would import and run; model "
            "directories are data, never code (remove the key, or use an architecture transformers ships)"
        )


def check_files(root: str | os.PathLike[str], link_root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The cheap checks every resolved source gets: plain files only, no custom-code reference."""
    files = regular_files(root, link_root)
    check_no_remote_code(root, files)
    return files


def check_no_code(root: str | os.PathLike[str]) -> None:
    """Refuse a directory that ships code files (the registry serves what it stores)."""
    base = Path(root)
    code = [p.relative_to(base).as_posix() for p in regular_files(base) if p.suffix.lower() in CODE_SUFFIXES]
    if code:
        raise ModelFilesError(f"{base}: holds code file(s) {', '.join(code[:3])}; a registered model is data "
                              "only (weights, config, tokenizer)")


# ── weights ─────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_safetensors_header(path: Path) -> list[Tensor]:
    """`parse_safetensors_header` of a local file."""
    with path.open("rb") as f:
        def read(start: int, length: int) -> bytes:
            f.seek(start)
            return f.read(length)

        return parse_safetensors_header(str(path), path.stat().st_size, read)


def parse_safetensors_header(where: str, size: int, read: Callable[[int, int], bytes]) -> list[Tensor]:
    """Parse a safetensors header ourselves, bounded, and check every entry against the file size.

    `read(start, length)` returns the file's bytes there (a local file, or ranged GETs of an S3 object:
    preflight checks a remote model's headers without downloading its weights).
    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}} (offsets relative to byte 8 + N), then the data. Checked: N within
    MAX_HEADER_BYTES and the file, dtypes known, shapes non-negative ints, end − begin equal to the
    shape's size, no overlap, and the data ending exactly at the end of the file (a truncated or
    padded file is refused)."""
    raw = read(0, 8) if size >= 8 else b""
    if len(raw) < 8:
        raise ModelFilesError(f"{where}: truncated safetensors file ({size} bytes, no header)")
    n = int.from_bytes(raw, "little")
    if n > MAX_HEADER_BYTES:
        raise ModelFilesError(f"{where}: safetensors header claims {n} bytes (limit {MAX_HEADER_BYTES})")
    if 8 + n > size:
        raise ModelFilesError(f"{where}: truncated safetensors file (header of {n} bytes, file of {size})")
    try:
        header = json.loads(read(8, n))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ModelFilesError(f"{where}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelFilesError(f"{where}: safetensors header is not a JSON object")
    data_start, tensors = 8 + n, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors.append(_tensor_entry(where, name, entry, data_start))
    tensors.sort(key=lambda t: (t.start, t.end))
    cursor = data_start
    for t in tensors:
        if t.start < cursor:
            raise ModelFilesError(f"{where}: tensor '{t.name}' overlaps the one before it")
        cursor = t.end
    if cursor > size:
        raise ModelFilesError(f"{where}: truncated safetensors file (tensors need {cursor} bytes, file has {size})")
    if cursor < size and tensors:
        raise ModelFilesError(f"{where}: {size - cursor} bytes after the last tensor (not a safetensors file)")
    return tensors


def _tensor_entry(file: str, name: str, entry: Any, data_start: int) -> Tensor:
    where = f"{file}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise ModelFilesError(f"{where}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise ModelFilesError(f"{where}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ModelFilesError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ModelFilesError(f"{where}: data_offsets {offsets!r} are not [begin, end] with begin <= end")
    numel = 1
    for d in shape:
        numel *= d
    if numel * DTYPE_BITS[dtype] != (offsets[1] - offsets[0]) * 8:
        raise ModelFilesError(f"{where}: shape {shape} of {dtype} needs {numel * DTYPE_BITS[dtype] // 8} bytes, "
                              f"data_offsets give {offsets[1] - offsets[0]}")
    return Tensor(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def weight_files(root: Path, files: Iterable[Path]) -> list[Path]:
    """The safetensors files of a directory; a pickle-only directory is refused before torch sees it."""
    files = list(files)
    weights = [p for p in files if p.suffix == ".safetensors"]
    if weights:
        return weights
    pickled = [p.relative_to(root).as_posix() for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickled:
        raise ModelFilesError(f"{root / pickled[0]}: pickle-format weights only ({', '.join(pickled[:3])}); only "
                              "safetensors are loaded (pickles run code): convert with save_pretrained("
                              "safe_serialization=True)")
    raise ModelFilesError(f"{root}: no .safetensors weights found")


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a config (multimodal configs nest it under `text_config`)."""
    nested = config.get("text_config")
    return nested if isinstance(nested, Mapping) else config


def _int_field(config: Mapping[str, Any], key: str, path: Path | str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if type(value) is not int or value <= 0:
        raise ModelFilesError(f"{path}: {key}={value!r} is not a positive integer")
    return value


def check_weights_match_config(config_path: Path | str, config: Mapping[str, Any], tensors: Iterable[Tensor]) -> None:
    """The weights' embedding, lm_head and layer count against config.json's vocab_size,
    hidden_size and num_hidden_layers: transformers allocates the model from the config before it
    reads any weight, so a config that lies costs memory (or a 64 GB allocation) before an error."""
    cfg = text_config(config)
    vocab = _int_field(cfg, "vocab_size", config_path)
    hidden = _int_field(cfg, "hidden_size", config_path)
    layers = _int_field(cfg, "num_hidden_layers", config_path)
    tensors = list(tensors)
    for t in tensors:
        if (_EMBEDDING.search(t.name) or _LM_HEAD.search(t.name)) and len(t.shape) == 2:
            if vocab is not None and t.shape[0] != vocab:
                raise ModelFilesError(f"{config_path}: vocab_size={vocab} but the weights' {t.name} has "
                                      f"{t.shape[0]} rows")
            if hidden is not None and t.shape[1] != hidden:
                raise ModelFilesError(f"{config_path}: hidden_size={hidden} but the weights' {t.name} has "
                                      f"{t.shape[1]} columns")
    indices = {int(m.group(1)) for t in tensors if (m := _LAYER.search(t.name))}
    if layers is not None and indices and max(indices) + 1 != layers:
        raise ModelFilesError(f"{config_path}: num_hidden_layers={layers} but the weights hold "
                              f"{max(indices) + 1} layer(s)")


def check_architecture(root: Path | str, tensors: Iterable[Tensor], config: Mapping[str, Any] | None = None) -> None:
    """Every weight whose name the architecture has must have the architecture's shape.

    The model is built from config.json (or the already-read `config` dict: an S3 folder) on the `meta` device
    (shapes, no memory), with trust_remote_code=False, after `check_no_remote_code` passed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_uri = f"{str(root).rstrip('/')}/config.json"
    try:
        if config is None:
            built = AutoConfig.from_pretrained(root, trust_remote_code=False)
        else:
            data = dict(config)
            built = AutoConfig.for_model(data.pop("model_type", None), **data)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(built, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        first = " ".join(str(exc).split())[:240] or type(exc).__name__
        raise ModelFilesError(f"{config_uri}: not a causal LM transformers can build: {first}") from None
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    tensors = list(tensors)
    matched = 0
    for t in tensors:
        want = shapes.get(t.name)
        if want is None:
            continue
        matched += 1
        if want != t.shape:
            raise ModelFilesError(f"{config_uri}: the architecture wants {t.name} of shape {list(want)}, "
                                  f"the weights hold {list(t.shape)}")
    if tensors and not matched:
        raise ModelFilesError(f"{root}: no weight name matches the {type(model).__name__} built from config.json")


# ── tokenizer and chat template ─────────────────────────────────────────────────────────────────


def tokenizer_size(path: Path) -> int:
    """1 + the largest token id a tokenizer.json can emit (its vocabulary and added tokens)."""
    data = read_json(path)
    ids: list[int] = []
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        ids += [v for v in vocab.values() if type(v) is int]
    elif isinstance(vocab, list):  # Unigram: [[piece, score], …], ids are positions
        ids.append(len(vocab) - 1)
    for added in data.get("added_tokens") or [] if isinstance(data, dict) else []:
        if isinstance(added, dict) and type(added.get("id")) is int:
            ids.append(added["id"])
    return max(ids, default=-1) + 1


def check_tokenizer_fits(root: Path, vocab_size: int | None) -> None:
    """A tokenizer that can emit an id ≥ the embedding's rows fails mid-run (IndexError); refuse it now."""
    path = root / "tokenizer.json"
    if vocab_size is None or not path.is_file():
        return
    n = tokenizer_size(path)
    if n > vocab_size:
        raise ModelFilesError(f"{path}: token ids go up to {n - 1}, but the embedding (config.json vocab_size) "
                              f"has {vocab_size} rows")


def chat_templates(root: Path) -> list[tuple[str, str]]:
    """(where, template) for every chat template the tokenizer would load."""
    found: list[tuple[str, str]] = []
    tc = root / "tokenizer_config.json"
    if tc.is_file():
        value = read_json(tc).get("chat_template")
        if isinstance(value, str):
            found.append((f"{tc}: chat_template", value))
        elif isinstance(value, list):
            found += [(f"{tc}: chat_template[{i}]", v["template"]) for i, v in enumerate(value)
                      if isinstance(v, dict) and isinstance(v.get("template"), str)]
    cj = root / "chat_template.json"
    if cj.is_file() and isinstance(template := read_json(cj).get("chat_template"), str):
        found.append((f"{cj}: chat_template", template))
    for path in sorted([root / "chat_template.jinja", *root.glob("additional_chat_templates/*.jinja")]):
        if path.is_file():
            if path.stat().st_size > MAX_JSON_BYTES:
                raise ModelFilesError(f"{path}: {path.stat().st_size} bytes is not a chat template")
            found.append((str(path), path.read_text(encoding="utf-8", errors="replace")))
    return found


def check_chat_template(where: str, template: str, seconds: float = TEMPLATE_SECONDS,
                        max_output: int = TEMPLATE_MAX_OUTPUT) -> int:
    """Render `template` on a sample conversation in transformers' Jinja sandbox, in a child
    process with a CPU-time, wall-time, memory and output-size bound; returns the rendered size.

    Why a child process: the sandbox stops attribute access, not work — `range` nested twice is
    10^10 iterations with no output, and one filter call can allocate gigabytes; only a process
    limit stops those without trusting the template. The child is forked after the template
    compiles (compiling folds constants: `'a' * 10**10` is evaluated by the compiler, so even that
    happens in the child) and leaves with os._exit."""
    from transformers.utils import chat_template_utils  # imported here: the child imports nothing

    def render() -> bytes:
        try:
            compiled = chat_template_utils._compile_jinja_template(template)
        except Exception as exc:  # a syntax error in user data, any jinja2 TemplateError
            raise _Refused(f"not a valid Jinja template ({_one_line(exc)})") from None
        total = 0
        for chunk in compiled.generate(messages=SAMPLE_CHAT, add_generation_prompt=True, bos_token="<s>",
                                       eos_token="</s>", tools=None, documents=None):
            total += len(chunk.encode("utf-8", "replace"))
            if total > max_output:
                raise _Refused(f"renders more than {max_output} bytes for a one-line message")
        return str(total).encode()

    status, detail = run_bounded(render, seconds, "for a one-line message")
    if status != "ok":
        raise ModelFilesError(f"{where}: {detail.decode('utf-8', 'replace')}")
    return int(detail)


SAMPLE_CHAT = [{"role": "user", "content": "What is 1 + 1?"}]
RENDER_SECONDS_PER_PROMPT = 0.02  # CPU seconds per prompt on top of TEMPLATE_SECONDS (real templates: ~0.1 ms)
RENDER_BYTES_PER_PROMPT = 64 << 10  # rendered bytes a prompt may add beyond 4× its own length


def render_chat_prompts(tokenizer: Any, prompts: list[str]) -> list[str]:
    """`tokenizer.apply_chat_template` of each prompt as one user message, in a bounded child process.

    Why: preflight renders the model's chat template on one short sample, but a template can branch on the
    message — `{% if messages[0].content|length > 40 %}` then a 10^10 loop or a gigabyte string — and training
    renders every real prompt in the trainer's own process. Here all of them are rendered at once, by the
    tokenizer's own code (identical text), with CPU time growing with the count (TEMPLATE_SECONDS + 0.02 s a
    prompt), 512 MiB of extra memory and a bounded output; ModelFilesError (one line) otherwise."""
    if not prompts:
        return []

    def render() -> bytes:
        out = []
        for prompt in prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            if len(text) > 4 * len(prompt) + RENDER_BYTES_PER_PROMPT:
                raise _Refused(f"renders {len(text)} characters for a prompt of {len(prompt)}")
            out.append(text)
        return json.dumps(out).encode()

    seconds = TEMPLATE_SECONDS + RENDER_SECONDS_PER_PROMPT * len(prompts)
    status, payload = run_bounded(render, seconds, f"for {len(prompts)} prompt(s)")
    if status != "ok":
        raise ModelFilesError(f"the model's chat template: {payload.decode('utf-8', 'replace')}")
    return json.loads(payload)


class _Refused(Exception):
    """Raised inside the child: the one-line reason it sends back."""


def run_bounded(work: Callable[[], bytes], seconds: float, what: str,
                memory: int = TEMPLATE_MAX_MEMORY) -> tuple[str, bytes]:
    """Run `work()` in a forked child with `seconds` of CPU and wall time and `memory` extra address space;
    returns ("ok", its bytes) or (status, a one-line reason). The child runs only already-imported pure Python
    (no torch, no new imports) and leaves with os._exit, so forking a threaded process is safe here."""
    import resource
    import select
    import signal
    import time
    import warnings

    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            cpu = max(1, int(seconds) + 1)
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            _limit_memory(memory)
            try:
                reply = b"ok\0" + work()
            except _Refused as exc:
                reply = f"error\0{exc}"[:500].encode()
            except MemoryError:
                reply = f"error\0needs more than {memory >> 20} MiB to render".encode()
            except BaseException as exc:  # SecurityError, UndefinedError, raise_exception(...)
                reply = f"error\0rendering failed: {_one_line(exc)}"[:500].encode()
            view = memoryview(reply)
            while view:
                view = view[os.write(write_fd, view):]
        finally:
            os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + seconds + 1.0
    chunks: list[bytes] = []
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([read_fd], [], [], max(left, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                return "timeout", f"rendering took more than {seconds:g} s {what} (a loop?)".encode()
            data = os.read(read_fd, 1 << 16)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(read_fd)
        _, wait_status = os.waitpid(pid, 0)
    reply = b"".join(chunks)
    if b"\0" not in reply:
        if os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) in (signal.SIGXCPU, signal.SIGKILL):
            return "timeout", f"rendering took more than {seconds:g} s of CPU {what} (a loop?)".encode()
        return "error", f"rendering process ended without an answer (status {wait_status})".encode()
    status, _, payload = reply.partition(b"\0")
    return status.decode(), payload


def _limit_memory(extra: int) -> None:
    """Cap the child's address space at what it has now plus `extra` bytes (Linux /proc)."""
    import resource

    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[0])
    except OSError:
        return
    now = pages * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (now + extra, now + extra))


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


# ── everything, before a load ───────────────────────────────────────────────────────────────────


def check_model_dir(root: str | os.PathLike[str], link_root: str | os.PathLike[str] | None = None) -> None:
    """Every check, in the order a user would fix them; before any from_pretrained of `root`."""
    base = Path(root)
    files = check_files(base, link_root)
    config_path = base / "config.json"
    if not config_path.is_file():
        raise ModelFilesError(f"{base}: not a Hugging Face model directory (no config.json)")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise ModelFilesError(f"{config_path}: not a JSON object")
    tensors = [t for path in weight_files(base, files) for t in read_safetensors_header(path)]
    check_weights_match_config(config_path, config, tensors)
    check_tokenizer_fits(base, _int_field(text_config(config), "vocab_size", config_path))
    for where, template in chat_templates(base):
        check_chat_template(where, template)
    check_architecture(base, tensors)


# ── identity ────────────────────────────────────────────────────────────────────────────────────


def content_digest(root: str | os.PathLike[str]) -> str:
    """sha256 of the model's content: every tensor (name, dtype, shape, bytes) across all
    safetensors files, and the config/tokenizer files (JSON canonicalised, VOLATILE_KEYS dropped).

    Not a folder listing: a cache file (`.amft-source.json`), a README, MLflow's files or another
    sharding of the same tensors do not change it; one changed weight byte does."""
    base = Path(root)
    files = regular_files(base)
    lines = []
    for path in files:
        rel = path.relative_to(base).as_posix()
        if path.suffix == ".safetensors":
            for t in read_safetensors_header(path):
                lines.append(f"tensor\0{t.name}\0{t.dtype}\0{list(t.shape)}\0{_range_sha256(path, t.start, t.end)}")
        elif rel in CONTENT_FILES or rel.startswith("additional_chat_templates/"):
            lines.append(f"file\0{rel}\0{_file_digest(path)}")
    if not any(line.startswith("tensor\0") for line in lines):
        raise ModelFilesError(f"{base}: no safetensors weights to compare")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    if path.suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in VOLATILE_KEYS}
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return _range_sha256(path, 0, path.stat().st_size)


def _range_sha256(path: Path, start: int, end: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(left, 1 << 22))
            if not block:
                raise ModelFilesError(f"{path}: truncated (ends before byte {end})")
            h.update(block)
            left -= len(block)
    return h.hexdigest()
