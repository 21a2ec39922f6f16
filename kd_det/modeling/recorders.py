"""
Recorders: what a model computed inside its forward, kept by name, so that Detectron2's own
forward runs unchanged and the distillation losses read the tensors afterwards.

* :class:`ModuleOutputRecorder` keeps the outputs (or inputs) of named submodules through
  forward hooks, e.g. ``{"features": "backbone", "cls_tower": Source("head.cls_subnet",
  calls="all")}``.  It works on a student in training and on a frozen teacher in eval mode.
* :class:`AnchorMatchRecorder` keeps, per image, what a dense detector's anchor matcher
  decided in the training pass: the matched object of every anchor and its label.  The
  matcher is no module (no hooks), so the recorder wraps it; ``label_anchors`` does not
  return the object index that Rank Mimicking needs.

Records hold graphs: read them with ``pop()`` once per step, which clears them.  Both
recorders also clear what is left when the model's own forward starts, so that no graph
outlives its step.  (mmrazor's recorders are the model for these.)
"""

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["Source", "ModuleOutputRecorder", "AnchorMatchRecorder"]


@dataclass(frozen=True)
class Source:
    """
    Where a record comes from.

    Attributes:
        module: dotted submodule name ("backbone", "head.cls_subnet"; "" for the model).
        kind: "output" or "input" (the positional inputs of the call).
        index: keep only this element of the output tuple / of the inputs (None: all of it;
            for inputs None keeps the tuple).
        calls: "last" keeps the last call's value; "all" keeps a list of every call's, e.g.
            a head tower that runs once per pyramid level.
    """

    module: str
    kind: str = "output"
    index: Optional[int] = None
    calls: str = "last"

    def __post_init__(self):
        if self.kind not in ("output", "input"):
            raise ValueError("Source.kind must be 'output' or 'input', got {!r}".format(self.kind))
        if self.calls not in ("last", "all"):
            raise ValueError("Source.calls must be 'last' or 'all', got {!r}".format(self.calls))


class _Recorder:
    """Pausing, clearing at the model's forward, and removing hooks: what both recorders share."""

    def __init__(self, model: nn.Module):
        self._model = model
        self._records: Dict[str, Any] = {}
        self._recording = True
        self._handles: List[Any] = [model.register_forward_pre_hook(self._clear_stale)]

    def _clear_stale(self, module, inputs):
        self._records.clear()

    @contextlib.contextmanager
    def paused(self):
        """A context in which nothing is recorded (e.g. a second head's pass)."""
        before, self._recording = self._recording, False
        try:
            yield
        finally:
            self._recording = before

    def clear(self) -> None:
        self._records.clear()

    def remove(self) -> None:
        """Remove the hooks (the records are cleared)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records.clear()


class ModuleOutputRecorder(_Recorder):
    """
    Keeps the outputs (or inputs) of named submodules of ``model`` through forward hooks.

    Example::

        rec = ModuleOutputRecorder(retinanet, {"images": Source("backbone", "input", 0),
                                               "features": "backbone", "head": "head"},
                                   training_only=True)
        losses = retinanet(batched_inputs)
        recorded = rec.pop()  # {"images": (N, 3, H, W), "features": {name: (N, C, H, W)},
                              #  "head": ([logits per level], [box deltas per level])}
    """

    def __init__(
        self,
        model: nn.Module,
        sources: Mapping[str, Union[str, Source]],
        training_only: bool = False,
    ):
        """
        Args:
            model: the model whose submodules are recorded.
            sources: record name -> :class:`Source` (a string is the output of that submodule).
            training_only: record only while ``model`` is in training mode (a student's
                inference keeps nothing); False for a teacher, which runs in eval mode.
        Raises:
            ValueError: naming a submodule that ``model`` does not have.
        """
        super().__init__(model)
        self.training_only = training_only
        self.sources = {name: Source(s) if isinstance(s, str) else s for name, s in sources.items()}
        modules = dict(model.named_modules())
        for name, source in self.sources.items():
            if source.module not in modules:
                self.remove()
                raise ValueError(
                    "cannot record {!r}: {} has no submodule {!r}".format(
                        name, type(model).__name__, source.module
                    )
                )
            hook = modules[source.module].register_forward_hook(self._hook(name, source))
            self._handles.append(hook)

    def _hook(self, name: str, source: Source):
        def keep(module, inputs, output):
            if not self._recording or (self.training_only and not self._model.training):
                return
            value = output if source.kind == "output" else inputs
            if source.index is not None:
                value = value[source.index]
            if source.calls == "all":
                self._records.setdefault(name, []).append(value)
            else:
                self._records[name] = value

        return keep

    def __contains__(self, name: str) -> bool:
        return name in self._records

    def __getitem__(self, name: str) -> Any:
        if name not in self._records:
            raise KeyError(
                "nothing recorded as {!r} since the last pop(): has {!r} run{} "
                "since?".format(
                    name,
                    self.sources[name].module if name in self.sources else name,
                    " in training mode" if self.training_only else "",
                )
            )
        return self._records[name]

    def pop(self) -> Dict[str, Any]:
        """Everything recorded since the last pop(), by name; cleared: no graph outlives a step."""
        records, self._records = self._records, {}
        return records


class _RecordingMatcher:
    """A matcher that reports each call to its recorder; anything else goes to the matcher."""

    def __init__(self, matcher, recorder: "AnchorMatchRecorder"):
        self.matcher = matcher
        self.recorder = recorder

    def __call__(self, match_quality_matrix: torch.Tensor):
        matches, labels = self.matcher(match_quality_matrix)
        self.recorder._keep(match_quality_matrix.shape[0], matches, labels)
        return matches, labels

    def __getattr__(self, name):
        if name in ("matcher", "recorder"):  # not set yet (copy/unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.matcher, name)


class AnchorMatchRecorder(_Recorder):
    """
    Keeps the decisions of a dense detector's anchor matcher (``model.anchor_matcher``, a
    Detectron2 :class:`Matcher`) in the training pass: per image, the object each anchor
    is matched to and the matcher's label (1 positive, 0 negative, -1 ignored).

    The matcher is replaced by a wrapper that calls it and keeps its outputs; ``remove()``
    puts the matcher back.  Detectron2 v0.6 calls the matcher for every image, later
    versions skip images without objects: :meth:`pop` fills those in as the matcher
    labels an empty image (every anchor ``matcher.labels[0]``, background).
    """

    def __init__(self, model: nn.Module, attribute: str = "anchor_matcher"):
        super().__init__(model)
        self._attribute = attribute
        self.matcher = getattr(model, attribute)
        setattr(model, attribute, _RecordingMatcher(self.matcher, self))

    def _keep(self, num_objects: int, matches: torch.Tensor, labels: torch.Tensor) -> None:
        if self._recording and self._model.training:
            self._records.setdefault("calls", []).append((num_objects, matches, labels))

    def remove(self) -> None:
        super().remove()
        if isinstance(getattr(self._model, self._attribute, None), _RecordingMatcher):
            setattr(self._model, self._attribute, self.matcher)

    @property
    def num_calls(self) -> int:
        """Matcher calls recorded since the last pop()."""
        return len(self._records.get("calls", ()))

    def pop(
        self, num_objects: Sequence[int], num_anchors: int, device: Optional[torch.device] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        The matching of the last training pass, cleared.

        Args:
            num_objects: per image of the batch, its number of ground-truth objects.
            num_anchors: R, the anchors of all levels.
            device: where to make the rows of images the matcher skipped (default: where
                its outputs are, else the CPU).
        Returns:
            matched_idxs: (N, R) long, the object (index in its image) of each anchor;
                meaningful where ``labels`` is positive.
            labels: (N, R) int8, the matcher's labels; -1 marks ignored anchors.
        Raises:
            RuntimeError: the matcher's calls do not fit the batch (it did not run since the
                last pop(), or ran more than once per image: pause the recorder around other
                matchings).
        """
        calls = self._records.pop("calls", [])
        if device is None:
            device = calls[0][1].device if calls else torch.device("cpu")
        mismatch = RuntimeError(
            "the anchor matcher's recorded calls (objects per call: {}) do not fit a batch with {} "
            "objects per image; it must run once per image in the training pass (pause the "
            "recorder around any other matching)".format([c[0] for c in calls], list(num_objects))
        )
        matched, labels = [], []
        for n in num_objects:
            if calls and calls[0][0] == n:
                _, m, lab = calls.pop(0)
            elif n == 0:
                # not called for an image without objects: as the matcher labels an empty image
                m = torch.zeros(num_anchors, dtype=torch.int64, device=device)
                lab = torch.full(
                    (num_anchors,), self.matcher.labels[0], dtype=torch.int8, device=device
                )
            else:
                raise mismatch
            if len(m) != num_anchors:
                raise RuntimeError(
                    "the anchor matcher labelled {} anchors, but the head predicts "
                    "for {}".format(len(m), num_anchors)
                )
            matched.append(m)
            labels.append(lab)
        if calls:
            raise mismatch
        return torch.stack(matched), torch.stack(labels)
