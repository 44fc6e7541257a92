"""Build a tiny, deterministic Llama model folder for end-to-end tests of disaggd.

The folder is a Hugging Face model that vLLM (CPU build included) can serve:

- ``tokenizer.json``: a byte-level BPE tokenizer (vocabulary of :data:`VOCAB_SIZE`
  entries, special tokens ``<unk>``, ``<s>``, ``</s>``, ``<pad>``) trained with the
  ``tokenizers`` library on the first :data:`CORPUS_MAX_BYTES` bytes of this Python's
  own standard library sources (top-level ``*.py`` files in sorted order). It adds
  ``<s>`` in front of every encoded text.
- ``tokenizer_config.json`` / ``special_tokens_map.json``: tokens and a small chat
  template, so that ``/v1/chat/completions`` works.
- ``config.json``: a 2-layer ``LlamaForCausalLM`` (hidden 128, intermediate 512, 4 query
  heads and 2 KV heads of head_dim 32, 2048 positions), float32.
- ``model.safetensors``: random weights, normal with standard deviation
  :data:`INITIALIZER_RANGE` (RMSNorm weights are ones), drawn from a ``torch.Generator``
  seeded with ``seed``. The large standard deviation makes greedy output varied text
  instead of one token repeated forever.
- ``disaggd-tinymodel.json``: the manifest, written last; it lists the sha256 of every
  other file. A folder with a valid manifest is complete.

The weights are float32 because vLLM's CPU build runs float32 with ``--enforce-eager``
(fast start), whereas bfloat16 with ``--enforce-eager`` crashes with SIGILL on CPUs
with AMX (see ``docs/vllm-cpu-notes.md``).

Two builds with the same seed, on the same Python and library versions, are
byte-identical. The tokenizer depends on the standard library's sources, hence on the
Python version; the manifest records it.

torch, transformers, tokenizers and safetensors are imported inside
:func:`build_tiny_model` only: importing this module costs nothing.

Usage::

    python -m devtools.tinymodel OUT_DIR [--seed N] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CORPUS_MAX_BYTES",
    "INITIALIZER_RANGE",
    "MANIFEST_NAME",
    "VOCAB_SIZE",
    "build_tiny_model",
    "is_complete",
    "main",
]

#: Requested tokenizer vocabulary size (entries, special tokens included).
VOCAB_SIZE = 4096
#: Upper bound on the training text, in bytes (UTF-8). About 2 s of training.
CORPUS_MAX_BYTES = 2 * 1024 * 1024
#: Standard deviation of the random weights.
INITIALIZER_RANGE = 0.2
#: Name of the manifest file written last into the model folder.
MANIFEST_NAME = "disaggd-tinymodel.json"
#: Bump when the folder's content changes for the same seed.
FORMAT_VERSION = 1

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)  # ids 0, 1, 2, 3

# Each message becomes "<|role|>\ncontent</s>\n"; the prompt starts with <s>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

MODEL_SHAPE: dict[str, int] = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
}


def _corpus_files() -> list[Path]:
    """The training files: top-level ``*.py`` of the stdlib, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"), key=lambda p: p.name)


def _corpus(max_bytes: int = CORPUS_MAX_BYTES) -> list[str]:
    """Read the training text: whole files until ``max_bytes`` (UTF-8 bytes) is reached.

    Returns a list of documents (one per file, the last one truncated).
    """
    docs: list[str] = []
    total = 0
    for path in _corpus_files():
        text = path.read_bytes().decode("utf-8", errors="replace")
        room = max_bytes - total
        if room <= 0:
            break
        data = text.encode("utf-8")[:room].decode("utf-8", errors="ignore")
        docs.append(data)
        total += len(data.encode("utf-8"))
    if not docs:
        raise RuntimeError(f"no training text found under {sysconfig.get_paths()['stdlib']}")
    return docs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON with sorted keys and a trailing newline (stable bytes)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _expected_params(seed: int) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "vocab_size_requested": VOCAB_SIZE,
        "corpus_max_bytes": CORPUS_MAX_BYTES,
        "initializer_range": INITIALIZER_RANGE,
        "python_version": ".".join(map(str, sys.version_info[:3])),
        **MODEL_SHAPE,
    }


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_complete(out_dir: Path, *, verify_hashes: bool = True) -> bool:
    """Whether ``out_dir`` holds a complete model folder written by :func:`build_tiny_model`.

    Complete means: the manifest exists and every file it lists exists (with the
    recorded sha256 when ``verify_hashes``; hashing ~7 MB takes milliseconds).
    """
    manifest = _read_manifest(out_dir)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        return False
    for name, digest in manifest["files"].items():
        path = out_dir / name
        if not path.is_file():
            return False
        if verify_hashes and _sha256(path) != digest:
            return False
    return True


def _train_tokenizer(out_dir: Path) -> int:
    """Train the BPE tokenizer and write its three files into ``out_dir``.

    Returns the actual vocabulary size (<= :data:`VOCAB_SIZE`).
    """
    from tokenizers import (  # type: ignore[import-untyped,unused-ignore]
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    docs = _corpus()
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def batches() -> Iterator[list[str]]:
        yield from ([d] for d in docs)

    tok.train_from_iterator(batches(), trainer=trainer, length=len(docs))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)

    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "pad_token": PAD,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MODEL_SHAPE["max_position_embeddings"],
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD},
    )
    return int(tok.get_vocab_size(with_added_tokens=True))


def _write_model(out_dir: Path, *, vocab_size: int, seed: int) -> None:
    """Write ``config.json``, ``generation_config.json`` and ``model.safetensors``."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_act="silu",
        initializer_range=INITIALIZER_RANGE,
        rms_norm_eps=1e-6,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        tie_word_embeddings=False,
        num_hidden_layers=MODEL_SHAPE["num_hidden_layers"],
        hidden_size=MODEL_SHAPE["hidden_size"],
        intermediate_size=MODEL_SHAPE["intermediate_size"],
        num_attention_heads=MODEL_SHAPE["num_attention_heads"],
        num_key_value_heads=MODEL_SHAPE["num_key_value_heads"],
        head_dim=MODEL_SHAPE["head_dim"],
        max_position_embeddings=MODEL_SHAPE["max_position_embeddings"],
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"

    # Instantiate on the meta device only to learn parameter names and shapes; the values
    # come from our own generator so they do not depend on transformers' init order.
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)  # type: ignore[no-untyped-call,unused-ignore]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in sorted(skeleton.state_dict().items()):
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape, dtype=torch.float32)
        else:
            value = torch.empty(param.shape, dtype=torch.float32)
            value.normal_(mean=0.0, std=INITIALIZER_RANGE, generator=gen)
        tensors[name] = value.contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    config_dict = config.to_dict()
    # Version strings would make the bytes depend on the installed transformers only
    # cosmetically; keep them out so the folder changes only when its meaning does.
    config_dict.pop("transformers_version", None)
    _write_json(out_dir / "config.json", config_dict)
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD]},
    )


def _already_built(out_dir: Path, params: dict[str, Any]) -> bool:
    """True when `out_dir` is complete with `params`; False when it is an empty folder
    (removed here, to be rebuilt).

    Raises:
        FileExistsError: it holds anything else.
    """
    manifest = _read_manifest(out_dir)
    if manifest is not None and is_complete(out_dir):
        if manifest.get("params") == params:
            return True
        raise FileExistsError(
            f"{out_dir} holds a tiny model built with other parameters "
            f"({manifest.get('params')!r}); pass force=True to rebuild"
        )
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
        return False
    raise FileExistsError(
        f"{out_dir} exists and is not a complete tiny model; pass force=True to replace it"
    )


def _remove(path: Path) -> None:
    """Remove a folder, file or link at `path`, if any."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def build_tiny_model(out_dir: Path, *, seed: int = 0, force: bool = False) -> Path:
    """Write the tiny Llama model folder into ``out_dir`` and return ``out_dir``.

    A no-op when ``out_dir`` is already complete (see :func:`is_complete`) and was built
    with the same parameters, unless ``force``. The folder is built in a temporary
    sibling directory and renamed into place, so it never appears half-written.

    Never touches the network. Takes a few seconds (tokenizer training dominates) and
    about 7 MB of disk.

    Raises:
        FileExistsError: ``out_dir`` exists but is not a complete tiny model, or was built
            with other parameters, and ``force`` is false.
    """
    out_dir = Path(out_dir)
    params = _expected_params(seed)
    if out_dir.exists() and not force and _already_built(out_dir, params):
        return out_dir

    # Offline: nothing below should reach for the Hub, but make sure of it.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        vocab_size = _train_tokenizer(tmp)
        _write_model(tmp, vocab_size=vocab_size, seed=seed)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_json(
            tmp / MANIFEST_NAME,
            {"params": params, "vocab_size": vocab_size, "files": files},
        )
        # mkdtemp makes the folder 0700 and safetensors writes 0600: make it readable
        # like any model folder (respecting the umask is not worth the bytes-diff risk).
        for p in tmp.iterdir():
            p.chmod(0o644)
        tmp.chmod(0o755)
        if force:
            _remove(out_dir)
        try:
            tmp.rename(out_dir)
        except OSError:
            # Another process (a parallel test run) finished the same build first.
            manifest = _read_manifest(out_dir)
            if manifest is None or manifest.get("params") != params or not is_complete(out_dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m devtools.tinymodel OUT_DIR [--seed N] [--force]``.

    Prints the folder's path on stdout. Returns 0; 1 when the folder exists and is
    not a complete tiny model built with these parameters (without ``--force``); 2 when
    torch, transformers, tokenizers or safetensors is missing.
    """
    parser = argparse.ArgumentParser(
        prog="python -m devtools.tinymodel",
        description="Build a tiny random Llama model folder (offline, deterministic).",
    )
    parser.add_argument("out_dir", type=Path, help="model folder to create")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    try:
        path = build_tiny_model(args.out_dir, seed=args.seed, force=args.force)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        print(
            f"error: {exc}; building the tiny model needs torch, transformers, tokenizers "
            "and safetensors (the environment that runs vLLM has them)",
            file=sys.stderr,
        )
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
