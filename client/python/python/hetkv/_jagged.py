"""Jagged sparse input and keyed output, shaped as TorchRec's: ``KeyedJaggedTensor``,
``JaggedTensor`` and ``KeyedTensor`` (the same methods, so code written for TorchRec reads them;
TorchRec's own ``KeyedJaggedTensor`` is accepted wherever this one is)."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["JaggedTensor", "KeyedJaggedTensor", "KeyedTensor"]


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths.to(torch.int64), 0, out=out[1:])
    return out


class JaggedTensor:
    """One feature of a batch: ``values`` (the ids of every bag, bag after bag), ``lengths``
    (ids per bag), optional ``weights`` (one per id)."""

    def __init__(
        self,
        values: torch.Tensor,
        lengths: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
    ):
        if values.dim() < 1 or lengths.dim() != 1:
            raise ValueError("values must be at least 1-D and lengths 1-D")
        self._values, self._lengths, self._weights = values, lengths, weights

    def values(self) -> torch.Tensor:
        return self._values

    def lengths(self) -> torch.Tensor:
        return self._lengths

    def offsets(self) -> torch.Tensor:
        return _offsets(self._lengths)

    def weights_or_none(self) -> Optional[torch.Tensor]:
        return self._weights

    def to_dense(self) -> List[torch.Tensor]:
        """Each bag's values."""
        return list(torch.split(self._values, self._lengths.tolist()))

    def __repr__(self) -> str:
        return f"JaggedTensor(values={self._values}, lengths={self._lengths})"


class KeyedJaggedTensor:
    """The sparse features of a batch, as TorchRec lays them out: ``keys`` (feature names),
    ``values`` (every id, feature after feature and, within a feature, bag after bag),
    ``lengths`` (ids per bag: ``len(keys) x stride``, feature-major) or ``offsets`` (where each
    bag starts, one more than the bags), optional ``weights`` (one per id). ``stride`` is the
    batch size (bags per feature)."""

    def __init__(
        self,
        keys: Sequence[str],
        values: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        lengths: Optional[torch.Tensor] = None,
        offsets: Optional[torch.Tensor] = None,
        stride: Optional[int] = None,
    ):
        self._keys = list(keys)
        if (lengths is None) == (offsets is None):
            raise ValueError("give lengths or offsets (one of them)")
        if lengths is None:
            lengths = offsets[1:] - offsets[:-1]
        lengths = lengths.to(torch.int64)
        if values.dim() != 1:
            raise ValueError(f"values must be 1-D, not of shape {tuple(values.shape)}")
        if weights is not None and weights.shape != values.shape:
            raise ValueError(
                f"weights of shape {tuple(weights.shape)} for values of {tuple(values.shape)}"
            )
        if stride is None:
            if len(self._keys) == 0:
                stride = 0
            elif len(lengths) % len(self._keys):
                raise ValueError(
                    f"{len(lengths)} lengths are not a whole number of bags for "
                    f"{len(self._keys)} features"
                )
            else:
                stride = len(lengths) // len(self._keys)
        if len(lengths) != stride * len(self._keys):
            raise ValueError(
                f"{len(lengths)} lengths for {len(self._keys)} features of {stride} bags"
            )
        if bool((lengths < 0).any()):
            raise ValueError("a negative length")
        if int(lengths.sum()) != len(values):
            raise ValueError(f"lengths sum to {int(lengths.sum())}, but there are {len(values)} values")
        self._values, self._weights, self._lengths, self._stride = values, weights, lengths, stride

    @staticmethod
    def from_lengths_sync(
        keys: Sequence[str],
        values: torch.Tensor,
        lengths: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        stride: Optional[int] = None,
    ) -> "KeyedJaggedTensor":
        return KeyedJaggedTensor(keys, values, weights=weights, lengths=lengths, stride=stride)

    @staticmethod
    def from_offsets_sync(
        keys: Sequence[str],
        values: torch.Tensor,
        offsets: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        stride: Optional[int] = None,
    ) -> "KeyedJaggedTensor":
        return KeyedJaggedTensor(keys, values, weights=weights, offsets=offsets, stride=stride)

    def keys(self) -> List[str]:
        return self._keys

    def values(self) -> torch.Tensor:
        return self._values

    def weights(self) -> torch.Tensor:
        if self._weights is None:
            raise ValueError("this KeyedJaggedTensor has no weights")
        return self._weights

    def weights_or_none(self) -> Optional[torch.Tensor]:
        return self._weights

    def lengths(self) -> torch.Tensor:
        return self._lengths

    def offsets(self) -> torch.Tensor:
        return _offsets(self._lengths)

    def stride(self) -> int:
        return self._stride

    def length_per_key(self) -> List[int]:
        if not self._keys:
            return []
        return self._lengths.reshape(len(self._keys), self._stride).sum(1).tolist()

    def offset_per_key(self) -> List[int]:
        return _cumulative(self.length_per_key())

    def __getitem__(self, key: str) -> JaggedTensor:
        return _features(self, [key])[key]

    def to_dict(self) -> Dict[str, JaggedTensor]:
        return _features(self, self._keys)

    def to(self, device, non_blocking: bool = False) -> "KeyedJaggedTensor":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return KeyedJaggedTensor(
            self._keys, move(self._values), move(self._weights), move(self._lengths),
            stride=self._stride,
        )

    def __repr__(self) -> str:
        return (
            f"KeyedJaggedTensor(keys={self._keys}, stride={self._stride}, "
            f"values={len(self._values)})"
        )


def _cumulative(lengths) -> List[int]:
    """Where each of consecutive runs of ``lengths`` starts, and the end of the last."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return out


def _spans(kjt, names: Sequence[str]) -> Dict[str, Tuple[int, int, int]]:
    """Each of features ``names`` of a KeyedJaggedTensor (hetkv's or TorchRec's, through the
    methods both have): its place among the keys, and where its values start and end. The
    lengths per key are summed once (on a GPU, one wait), whatever the number of features."""
    keys = list(kjt.keys())
    missing = [n for n in names if n not in keys]
    if missing:
        raise KeyError(f"feature {missing[0]!r} is not in the batch (it has {keys})")
    at = _cumulative(kjt.length_per_key())
    return {n: (keys.index(n), at[keys.index(n)], at[keys.index(n) + 1]) for n in names}


def _features(kjt, names: Sequence[str], spans=None) -> Dict[str, JaggedTensor]:
    """Features ``names`` of a KeyedJaggedTensor as jagged tensors (views of its values);
    ``spans`` are their ``_spans`` when the caller has them."""
    stride = kjt.stride()
    lengths, values, weights = kjt.lengths(), kjt.values(), kjt.weights_or_none()
    out = {}
    for n, (i, start, end) in (spans or _spans(kjt, names)).items():
        out[n] = JaggedTensor(
            values[start:end],
            lengths[i * stride : (i + 1) * stride],
            None if weights is None else weights[start:end],
        )
    return out


class KeyedTensor:
    """Pooled embeddings of a batch, as TorchRec's ``KeyedTensor``: ``values`` of shape
    ``stride x sum(length_per_key)``, each key's columns after the previous key's."""

    def __init__(self, keys: Sequence[str], length_per_key: Sequence[int], values: torch.Tensor):
        self._keys, self._lengths, self._values = list(keys), list(length_per_key), values
        self._at = {k: sum(self._lengths[:i]) for i, k in enumerate(self._keys)}

    def keys(self) -> List[str]:
        return self._keys

    def values(self) -> torch.Tensor:
        return self._values

    def length_per_key(self) -> List[int]:
        return self._lengths

    def offset_per_key(self) -> List[int]:
        return _cumulative(self._lengths)

    def key_dim(self) -> int:
        return 1

    def __getitem__(self, key: str) -> torch.Tensor:
        i = self._keys.index(key)
        return self._values[:, self._at[key] : self._at[key] + self._lengths[i]]

    def to_dict(self) -> Dict[str, torch.Tensor]:
        return {k: self[k] for k in self._keys}

    def __repr__(self) -> str:
        return f"KeyedTensor(keys={self._keys}, length_per_key={self._lengths})"
