"""``torch.func.vmap`` rules for the fused ops.

Every op computes each image of its batch ``B`` on its own, so a vmapped dimension ``V`` over the
per-image arguments folds into ``B``: one op call on ``V*B`` images, the outputs unfolded again.
Where a weight or bias is vmapped too (an ensemble: ``torch.func.stack_module_state`` +
``functional_call``), or the op returns sums over ``B`` (the backward ops' weight and bias
gradients), the rule calls the op once per index and stacks the results.  Without a rule PyTorch
ran a per-index loop of its own, with a warning that asks users to file an issue with PyTorch.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def register_vmap_rule(op, per_image: Sequence[int] = ()) -> None:
    """Register ``op``'s vmap rule.  ``per_image``: positions of the arguments whose first dimension
    is ``B`` and on which the outputs depend image by image -- every output then has ``B`` first
    (the forward ops); empty for an op with an output summed over ``B`` (the backward ops)."""
    per_image = frozenset(per_image)

    def rule(info, in_dims, *args):
        V = info.batch_size
        vmapped = {i for i, d in enumerate(in_dims) if d is not None}
        if per_image and vmapped <= per_image:
            out = op(*(_fold(a, in_dims[i], V) if i in per_image else a for i, a in enumerate(args)))
            return tuple(o.unflatten(0, (V, o.shape[0] // V)) for o in out), (0,) * len(out)
        outs = [op(*(a if d is None else a.select(d, v) for a, d in zip(args, in_dims))) for v in range(V)]
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])

    op.register_vmap(rule)


def _fold(a, dim, V: int):
    """``a`` with the vmapped dimension (``dim``; None: not vmapped, so the same for every index)
    folded into its first: ``(V*B, ...)``."""
    if not isinstance(a, Tensor):
        return a
    a = a.movedim(dim, 0) if dim is not None else a.expand(V, *a.shape)
    return a.flatten(0, 1)
