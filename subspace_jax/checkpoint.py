"""Orbax save and restore of parameter trees that contain kernel forms.

Kernel forms are registered pytrees, so orbax stores their array fields like any
other leaf (as ``.../kernel/a``, ``.../kernel/b``, ...). Restoring needs a target
that fixes the tree structure, i.e. which leaves are forms: pass the tree itself
or its abstract version from :func:`abstract` (``jax.eval_shape``), which costs
no memory. Works for an ``nnx.State``, pure dicts and linen variables.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["save", "restore", "abstract"]


def abstract(tree: Any) -> Any:
    """The tree with every array replaced by a ``jax.ShapeDtypeStruct`` (shardings kept).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import checkpoint
        >>> checkpoint.abstract({"w": jnp.ones((2, 3))})["w"].shape
        (2, 3)
    """
    return jax.eval_shape(lambda t: t, tree)


def save(directory: str | pathlib.Path, tree: Any, *, overwrite: bool = False) -> pathlib.Path:
    """Save ``tree`` to ``directory`` with orbax and wait until it is written.

    Args:
        directory: target directory (made absolute); must not exist unless ``overwrite``.
        tree: a pytree of arrays and kernel forms (``nnx.State``, dict, linen variables).
        overwrite: replace an existing checkpoint at ``directory``.

    Returns:
        The absolute checkpoint path.

    Raises:
        FileExistsError: ``directory`` exists and ``overwrite`` is False (nothing is touched).

    Examples:
        >>> import tempfile, jax.numpy as jnp
        >>> from subspace_jax import checkpoint, forms
        >>> tree = {"k": forms.LowRank(jnp.ones((3, 1)), jnp.ones((1, 2)))}
        >>> path = checkpoint.save(tempfile.mkdtemp() + "/ckpt", tree)
        >>> checkpoint.restore(path, checkpoint.abstract(tree))["k"].b.shape
        (1, 2)
    """
    path = pathlib.Path(directory).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"checkpoint directory {path} exists; pass overwrite=True to replace it")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, force=overwrite)
        ckptr.wait_until_finished()
    return path


def restore(directory: str | pathlib.Path, target: Any) -> Any:
    """Restore a tree saved by :func:`save`.

    Args:
        directory: the checkpoint path.
        target: a tree with the saved structure: concrete arrays or
            ``jax.ShapeDtypeStruct`` leaves (see :func:`abstract`); its dtypes and
            shardings are those of the restored arrays.

    Returns:
        The restored tree, of the same kind as ``target``. Its arrays are committed to
        their devices; a jitted step compiled for uncommitted arrays (fresh from
        ``jnp``/init) compiles once more on them, without retracing. Pass
        ``jax.device_put`` state to the first step to share one executable.

    Raises:
        FileNotFoundError: no checkpoint at ``directory``.
        ValueError: the checkpoint's structure or shapes do not match ``target``.

    Examples:
        >>> import tempfile, jax.numpy as jnp
        >>> from subspace_jax import checkpoint
        >>> path = checkpoint.save(tempfile.mkdtemp() + "/ckpt", {"w": jnp.arange(3.0)})
        >>> checkpoint.restore(path, {"w": jnp.zeros(3)})["w"].tolist()
        [0.0, 1.0, 2.0]
    """
    path = pathlib.Path(directory).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, abstract(target))
