"""Who attends to whom: the attention policy, its presets, and the block table it compiles to.

A policy says, for each pair of segments (text, hires, guide), whether queries of the first see none, a local
part, or all of the second. It is defined on attention blocks: a hires query block sees whole key blocks, so every
allowed block is full and no kernel ever evaluates a per-token mask.

Local reach, in the coordinates of the blocks' compact rectangles (``HierLayout.block_rects``):

- hires -> hires: the own window, plus every key block that intersects the query block dilated by
  ``hires_halo_tokens`` (default half a window: with 16-token windows and 128-token blocks, the own window, the
  left and right windows and the nearer half of the three windows above or below: 9 blocks);
- hires -> guide: the guide tiles that intersect the query block's footprint on the guide grid (``rho`` times
  smaller) dilated by ``guide_margin_tokens`` (rows, cols) guide tokens (default one window's footprint);
- guide -> guide: the own tile plus tiles within ``guide_radius_tokens``.

:func:`build_plan` enumerates the allowed key blocks of every query block directly (work linear in the
sequence); :meth:`AttentionPolicy.token_mask` derives the same rules pairwise from token coordinates, as an
independent check for tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path

import torch

from ultragen.layout import HierLayout, Segment

MAX_PLAN_BYTES = 2 << 30  # the block-index tables of one plan; beyond this the size or the policy is wrong
MAX_TOKEN_MASK_TOKENS = 16384  # a dense (S, S) token mask is for tests and small references only


class Reach(str, Enum):
    """How much of a key segment the queries of a segment see."""

    NONE = "none"
    LOCAL = "local"
    ALL = "all"


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class AttentionPolicy:
    """The attention pattern of the hierarchical forward, one reach per (query segment, key segment) pair.

    Text always sees text, a hires block always its own window, and a guide tile itself. ``None`` in a size field
    means: derived from the layout (``hires_halo_tokens``: half a window; ``guide_margin_tokens``: one window's
    footprint ``window / rho`` guide tokens each way).
    """

    name: str = "custom"
    text_to_hires: Reach = Reach.NONE
    text_to_guide: Reach = Reach.ALL
    hires_to_text: Reach = Reach.ALL
    hires_to_hires: Reach = Reach.LOCAL
    hires_halo_tokens: int | None = None
    hires_to_guide: Reach = Reach.LOCAL
    guide_margin_tokens: tuple[int, int] | None = None
    guide_to_guide: Reach = Reach.ALL
    guide_radius_tokens: int = 2
    guide_to_text: Reach = Reach.NONE
    guide_to_hires: Reach = Reach.NONE

    def __post_init__(self) -> None:
        allowed = {
            "text_to_hires": (Reach.NONE, Reach.ALL),
            "text_to_guide": (Reach.NONE, Reach.ALL),
            "hires_to_text": (Reach.NONE, Reach.ALL),
            "hires_to_hires": (Reach.LOCAL, Reach.ALL),
            "hires_to_guide": tuple(Reach),
            "guide_to_guide": (Reach.LOCAL, Reach.ALL),
            "guide_to_text": (Reach.NONE, Reach.ALL),
            "guide_to_hires": (Reach.NONE, Reach.ALL),
        }
        for name, choices in allowed.items():
            value = getattr(self, name)
            try:
                reach = Reach(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a reach; use one of {[c.value for c in choices]}") from None
            if reach not in choices:
                raise ValueError(f"{name}={reach.value!r} is not supported; use one of {[c.value for c in choices]}")
            object.__setattr__(self, name, reach)
        if self.hires_halo_tokens is not None and not _whole(self.hires_halo_tokens):
            raise ValueError(f"hires_halo_tokens={self.hires_halo_tokens!r} must be a whole number >= 0 (0: own window "
                             f"only) or None (half a window)")
        if self.guide_margin_tokens is not None:
            margin = tuple(self.guide_margin_tokens) if isinstance(self.guide_margin_tokens, (list, tuple)) else ()
            if len(margin) != 2 or not all(_whole(m) for m in margin):
                raise ValueError(f"guide_margin_tokens={self.guide_margin_tokens!r} must be two whole numbers >= 0 "
                                 f"(rows, cols) or None (one window's footprint)")
            object.__setattr__(self, "guide_margin_tokens", margin)
        if not _whole(self.guide_radius_tokens):
            raise ValueError(f"guide_radius_tokens={self.guide_radius_tokens!r} must be a whole number >= 0")

    @property
    def guide_isolated(self) -> bool:
        """Guide queries see only the guide: its keys and values are the same at every step and CFG branch."""
        return self.guide_to_text is Reach.NONE and self.guide_to_hires is Reach.NONE

    def halo_tokens(self, layout: HierLayout) -> int:
        return layout.window_tokens // 2 if self.hires_halo_tokens is None else self.hires_halo_tokens

    def margin_tokens(self, layout: HierLayout) -> tuple[int, int]:
        if self.guide_margin_tokens is not None:
            return self.guide_margin_tokens
        step = layout.window_tokens // (layout.rho or 1)
        return step, step

    def to_dict(self) -> dict:
        """JSON-ready form (stored in LoRA metadata and run records)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, Reach) else (list(value) if isinstance(value, tuple) else value)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> AttentionPolicy:
        known = {f.name for f in fields(cls)}
        if unknown := set(data) - known:
            raise ValueError(f"unknown attention policy keys {sorted(unknown)}; known: {sorted(known)}")
        data = dict(data)
        if data.get("guide_margin_tokens") is not None:
            data["guide_margin_tokens"] = tuple(data["guide_margin_tokens"])
        return cls(**data)

    def token_mask(self, layout: HierLayout) -> torch.Tensor:
        """(seq_tokens, seq_tokens) bool, True where query token i may attend key token j.

        Derived pairwise from each token's segment, window and the rectangle of the cell it lies in; for tests
        and small references (refuses more than MAX_TOKEN_MASK_TOKENS tokens).
        """
        n = layout.seq_tokens
        if n > MAX_TOKEN_MASK_TOKENS:
            raise ValueError(f"a dense token mask of {n} tokens is too large; use the block table (build_plan)")
        seg = layout.token_segments()
        coords = layout.token_coords()
        cells = layout.block_rects().repeat_interleave(layout.block_tokens, dim=0)  # (S, 4) rect of each token's cell
        q_seg, k_seg = seg[:, None], seg[None, :]
        q_cell, k_cell = cells[:, None, :], cells[None, :, :]

        def pair(a: Segment, b: Segment) -> torch.Tensor:
            return (q_seg == a) & (k_seg == b)

        mask = pair(Segment.TEXT, Segment.TEXT)
        for (a, b), reach in self._global_reaches().items():
            if reach is Reach.ALL:
                mask |= pair(a, b)
        w = layout.window_tokens
        window = coords // w
        same_window = (window[:, None, :] == window[None, :, :]).all(-1)
        hires_local = same_window
        if self.hires_to_hires is Reach.LOCAL:
            hires_local = hires_local | _intersects(_dilate(q_cell, *(self.halo_tokens(layout),) * 2), k_cell)
        else:
            hires_local = torch.ones_like(same_window)
        mask |= pair(Segment.HIRES, Segment.HIRES) & hires_local
        if layout.rho is not None:
            if self.hires_to_guide is Reach.LOCAL:
                foot = _dilate(_footprint(q_cell, layout.rho), *self.margin_tokens(layout))
                mask |= pair(Segment.HIRES, Segment.GUIDE) & _intersects(foot, k_cell)
            if self.guide_to_guide is Reach.LOCAL:
                near = _intersects(_dilate(q_cell, self.guide_radius_tokens, self.guide_radius_tokens), k_cell)
                mask |= pair(Segment.GUIDE, Segment.GUIDE) & near
        return mask

    def _global_reaches(self) -> dict[tuple[Segment, Segment], Reach]:
        """The reaches that are all-or-nothing (LOCAL ones are handled geometrically)."""
        t, h, g = Segment.TEXT, Segment.HIRES, Segment.GUIDE
        return {
            (t, h): self.text_to_hires,
            (t, g): self.text_to_guide,
            (h, t): self.hires_to_text,
            (h, h): self.hires_to_hires if self.hires_to_hires is Reach.ALL else Reach.NONE,
            (h, g): self.hires_to_guide if self.hires_to_guide is Reach.ALL else Reach.NONE,
            (g, g): self.guide_to_guide if self.guide_to_guide is Reach.ALL else Reach.NONE,
            (g, t): self.guide_to_text,
            (g, h): self.guide_to_hires,
        }


PRESETS: dict[str, AttentionPolicy] = {
    # ultragen's default: text gets a cheap global view through the guide (UltraGen text), hires sees its window
    # neighbourhood and the guide around it, the guide is global among itself and cached.
    "default": AttentionPolicy(name="default"),
    # what the authors' released code does (research/authors_repo.md section 2.1), without its wrap-around bug:
    # text -> text + all hires; hires -> guide a horizontal strip (margin 0 rows, 4 columns); guide -> local guide.
    # One difference remains: the authors' strip is one window tall (their 64-token guide key blocks, 4 guide rows
    # x 16 at rho 4), ours is two (our 128-token guide tiles are 8 rows x 16, and a key block is read whole). The
    # extra rows cost 3.9 % more token pairs at 4096x4096 (9,360 blocks of 128x128 instead of the 9,008 a 4-row
    # strip would need; 4.0 % with the guide cached) and let hires tokens see one more window row of the guide.
    "authors-code": AttentionPolicy(
        name="authors-code",
        text_to_hires=Reach.ALL,
        text_to_guide=Reach.NONE,
        guide_margin_tokens=(0, 4),
        guide_to_guide=Reach.LOCAL,
        guide_radius_tokens=2,
    ),
    # the older Scale-DiT paper: text -> text + hires; the guide global among itself and reading the text.
    "paper-v1": AttentionPolicy(
        name="paper-v1", text_to_hires=Reach.ALL, text_to_guide=Reach.NONE, guide_to_text=Reach.ALL
    ),
    # everything attends everything: the stock model's attention (tests, baselines)
    "dense": AttentionPolicy(
        name="dense",
        text_to_hires=Reach.ALL,
        hires_to_hires=Reach.ALL,
        hires_to_guide=Reach.ALL,
        guide_to_text=Reach.ALL,
        guide_to_hires=Reach.ALL,
    ),
}


POLICY_HELP = (f"attention policy: a preset ({', '.join(sorted(PRESETS))}) or a .json file of policy fields, "
               'e.g. {"base": "default", "hires_halo_tokens": 0}')


def get_policy(name_or_policy: str | dict | AttentionPolicy, **overrides) -> AttentionPolicy:
    """A preset by name (``default``, ``authors-code``, ``paper-v1``, ``dense``), a policy file or a policy's
    :meth:`AttentionPolicy.to_dict`, optionally with fields replaced. A policy file (``*.json``) holds
    ``to_dict`` fields, or ``"base"`` (a preset name) and the fields that differ from it; unnamed file policies are
    named after the file."""
    if isinstance(name_or_policy, AttentionPolicy):
        policy = name_or_policy
    elif isinstance(name_or_policy, dict):
        policy = AttentionPolicy.from_dict(name_or_policy)
    elif not isinstance(name_or_policy, str):
        raise ValueError(  # noqa: TRY004 - bad user input: ValueError, which the CLI reports in one line
            f"policy={name_or_policy!r}: pass a preset name, a .json file or an AttentionPolicy")
    elif name_or_policy in PRESETS:
        policy = PRESETS[name_or_policy]
    elif str(name_or_policy).endswith(".json"):
        policy = _policy_file(Path(name_or_policy))
    else:
        raise ValueError(f"unknown attention policy {name_or_policy!r}; choose one of {sorted(PRESETS)} or pass a "
                         f".json file of policy fields")
    return replace(policy, **overrides) if overrides else policy


def _policy_file(path: Path) -> AttentionPolicy:
    if not path.is_file():
        raise ValueError(f"policy file {str(path)!r} does not exist or is not a file; pass a preset name or a "
                         f".json file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"policy file {str(path)!r} is not readable JSON ({error}); fix it") from None
    if not isinstance(data, dict):  # bad user input: ValueError, which the CLI reports in one line
        raise ValueError(f"policy file {str(path)!r} must hold a JSON object of policy fields, got "  # noqa: TRY004
                         f"{type(data).__name__}")
    data = {"name": path.stem} | data
    base = data.pop("base", None)
    if base is not None and (not isinstance(base, str) or base not in PRESETS):
        raise ValueError(f"policy file {str(path)!r}: base={base!r} is not a preset; choose one of {sorted(PRESETS)}")
    try:
        return AttentionPolicy.from_dict(data if base is None else PRESETS[base].to_dict() | data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"policy file {str(path)!r}: {error}") from None


# --- rectangle helpers: rects are (..., 4) int64 (row0, row1, col0, col1), inclusive ---------------------------
def _dilate(rect: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return rect + torch.tensor([-rows, rows, -cols, cols], dtype=rect.dtype)


def _footprint(rect: torch.Tensor, rho: int) -> torch.Tensor:
    """The guide-grid cells a hires rect covers."""
    return torch.div(rect, rho, rounding_mode="floor")


def _intersects(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[..., 0] <= b[..., 1]) & (b[..., 0] <= a[..., 1]) & (a[..., 2] <= b[..., 3]) & (b[..., 2] <= a[..., 3])


# --- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """The block table of one layout under one policy: for query block i, the key blocks
    ``kv_indices[i, :kv_counts[i]]`` (ascending; the rest of the row is -1). Tensors live on the CPU;
    :meth:`on` gives cached copies on a device."""

    layout: HierLayout
    policy: AttentionPolicy
    kv_counts: torch.Tensor  # (n_blocks,) int32
    kv_indices: torch.Tensor  # (n_blocks, max_kv) int32
    _device_cache: dict = field(default_factory=dict, repr=False)

    @property
    def block_tokens(self) -> int:
        return self.layout.block_tokens

    @property
    def n_blocks(self) -> int:
        return self.layout.n_blocks

    @property
    def allowed_blocks(self) -> int:
        return int(self.kv_counts.sum())

    @property
    def block_density(self) -> float:
        return self.allowed_blocks / self.n_blocks**2

    def block_table(self) -> torch.Tensor:
        """(n_blocks, n_blocks) bool, True where query block i reads key block j."""
        table = torch.zeros(self.n_blocks, self.n_blocks + 1, dtype=torch.bool)
        idx = self.kv_indices.long().clone()
        idx[idx < 0] = self.n_blocks  # padding lands in a spare column
        table.scatter_(1, idx, True)
        return table[:, : self.n_blocks]

    def on(self, device: torch.device | str, key: str = "table") -> torch.Tensor:
        """Cached device copy of ``kv_counts``, ``kv_indices`` or the dense ``table``."""
        device = torch.device(device)
        cache_key = (key, str(device))
        if cache_key not in self._device_cache:
            source = {"kv_counts": self.kv_counts, "kv_indices": self.kv_indices}.get(key)
            if source is None:
                source = self.block_table()
            self._device_cache[cache_key] = source.to(device)
        return self._device_cache[cache_key]

    def query_blocks_of(self, segment: Segment) -> range:
        starts = self.layout.segment_offsets
        b = self.block_tokens
        return range(starts[segment] // b, starts[segment + 1] // b)

    def attention_flops(self, heads: int, head_dim: int, skip_guide_queries: bool = False) -> int:
        """Matmul FLOPs of one attention call (QK^T and PV): 4 * heads * head_dim * allowed token pairs.

        ``skip_guide_queries``: leave out guide query rows, which the guide key/value cache computes once per
        image when the guide is isolated."""
        blocks = self.allowed_blocks
        if skip_guide_queries:
            blocks -= int(self.kv_counts[self.query_blocks_of(Segment.GUIDE).start :].sum())
        return 4 * heads * head_dim * blocks * self.block_tokens**2

    def dense_flops(self, heads: int, head_dim: int) -> int:
        """FLOPs of dense attention over the plain FLUX sequence: text + the unpadded image, no guide."""
        rows, cols = self.layout.hires_grid
        n = self.layout.text_tokens + rows * cols
        return 4 * heads * head_dim * n * n


@dataclass(frozen=True)
class _SegmentCells:
    """Key segment seen as a grid of cells (windows or guide tiles), each holding ``blocks_per_cell`` blocks."""

    first_block: int
    cell: tuple[int, int]
    grid: tuple[int, int]  # in cells
    blocks_per_cell: int
    rects: torch.Tensor  # (blocks of the segment, 4)


def _local_keys(region: torch.Tensor, cells: _SegmentCells) -> torch.Tensor:
    """(n, K) indices of the key blocks whose rects intersect ``region`` (n, 4); -1 where none."""
    (ch, cw), (nr, nc) = cells.cell, cells.grid
    r_lo = (region[:, 0].clamp(min=0) // ch).clamp(max=nr - 1)
    r_hi = (region[:, 1].clamp(min=0) // ch).clamp(max=nr - 1)
    c_lo = (region[:, 2].clamp(min=0) // cw).clamp(max=nc - 1)
    c_hi = (region[:, 3].clamp(min=0) // cw).clamp(max=nc - 1)
    span_r, span_c = int((r_hi - r_lo).max()) + 1, int((c_hi - c_lo).max()) + 1
    cell_r = r_lo[:, None, None] + torch.arange(span_r).view(1, -1, 1)
    cell_c = c_lo[:, None, None] + torch.arange(span_c).view(1, 1, -1)
    valid = (cell_r <= r_hi[:, None, None]) & (cell_c <= c_hi[:, None, None])
    cell_id = (cell_r * nc + cell_c).reshape(len(region), -1)
    valid = valid.reshape(len(region), -1)
    local = cell_id[:, :, None] * cells.blocks_per_cell + torch.arange(cells.blocks_per_cell)
    local = local.reshape(len(region), -1)
    valid = valid.repeat_interleave(cells.blocks_per_cell, dim=1)
    hit = valid & _intersects(region[:, None, :], cells.rects[local.clamp(max=len(cells.rects) - 1)])
    return torch.where(hit, local + cells.first_block, -1)


def _estimate_row_width(layout: HierLayout, policy: AttentionPolicy) -> int:
    """Upper bound on the key blocks of one query row (to refuse plans that cannot fit before building)."""
    b = layout.block_tokens
    text, hires, guide = layout.text_tokens // b, layout.hires_tokens // b, layout.guide_tokens // b
    width = text + (hires if Reach.ALL in (policy.text_to_hires, policy.hires_to_hires, policy.guide_to_hires) else 0)
    return width + guide + 64


def build_plan(layout: HierLayout, policy: AttentionPolicy | str = "default") -> AttentionPlan:
    """Compile ``policy`` on ``layout`` into the block table every attention backend reads."""
    policy = get_policy(policy)
    width = _estimate_row_width(layout, policy)
    if 3 * 4 * layout.n_blocks * width > MAX_PLAN_BYTES:
        raise ValueError(
            f"the attention plan for {layout.width_px}x{layout.height_px} px under policy '{policy.name}' needs "
            f"about {3 * 4 * layout.n_blocks * width / 2**30:.1f} GiB of block tables (limit "
            f"{MAX_PLAN_BYTES / 2**30:.0f} GiB); use a local policy such as 'default' or a smaller size"
        )
    b = layout.block_tokens
    seg = layout.block_segments()
    rects = layout.block_rects()
    first = [layout.segment_offsets[s] // b for s in Segment] + [layout.n_blocks]
    all_of = {s: torch.arange(first[s], first[s + 1]) for s in Segment}
    w = layout.window_tokens
    hires_cells = _SegmentCells(first[Segment.HIRES], (w, w), layout.window_grid, w * w // b, rects[seg == Segment.HIRES])
    guide_cells = None
    if layout.rho is not None:
        th, tw = layout.guide_tile
        grid = (layout.guide_grid[0] // th, layout.guide_grid[1] // tw)
        guide_cells = _SegmentCells(first[Segment.GUIDE], (th, tw), grid, 1, rects[seg == Segment.GUIDE])
    rows = []
    globals_ = policy._global_reaches()
    globals_[(Segment.TEXT, Segment.TEXT)] = Reach.ALL
    for q in Segment:
        q_rects = rects[first[q] : first[q + 1]]
        n_q = len(q_rects)
        if n_q == 0:
            continue
        parts = [all_of[k].expand(n_q, -1) for k in Segment if globals_.get((q, k)) is Reach.ALL]
        if q is Segment.HIRES:
            parts.append(_own_window(q_rects, hires_cells))
            if policy.hires_to_hires is Reach.LOCAL:
                parts.append(_local_keys(_dilate(q_rects, *(policy.halo_tokens(layout),) * 2), hires_cells))
            if guide_cells is not None and policy.hires_to_guide is Reach.LOCAL:
                foot = _dilate(_footprint(q_rects, layout.rho), *policy.margin_tokens(layout))
                parts.append(_local_keys(foot, guide_cells))
        if q is Segment.GUIDE:
            r = policy.guide_radius_tokens
            parts.append(_local_keys(_dilate(q_rects, r, r), guide_cells))
        rows.append(_sorted_unique(torch.cat(parts, dim=1), layout.n_blocks))
    max_kv = max(r.shape[1] for r in rows)
    kv = torch.cat([torch.nn.functional.pad(r, (0, max_kv - r.shape[1]), value=-1) for r in rows])
    counts = (kv >= 0).sum(1).to(torch.int32)
    max_kv = int(counts.max())
    return AttentionPlan(layout, policy, counts, kv[:, :max_kv].to(torch.int32).contiguous())


def _own_window(q_rects: torch.Tensor, cells: _SegmentCells) -> torch.Tensor:
    w = cells.cell[0]
    window = (q_rects[:, 0] // w) * cells.grid[1] + q_rects[:, 2] // w
    return cells.first_block + window[:, None] * cells.blocks_per_cell + torch.arange(cells.blocks_per_cell)


def _sorted_unique(idx: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Each row's distinct non-negative entries, ascending, padded with -1."""
    idx = torch.where(idx < 0, n_blocks, idx).sort(dim=1).values
    dup = torch.zeros_like(idx, dtype=torch.bool)
    dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
    idx = torch.where(dup, n_blocks, idx).sort(dim=1).values
    width = int((idx < n_blocks).sum(1).max())
    idx = idx[:, :width]
    return torch.where(idx >= n_blocks, -1, idx)
