"""The 2-D window-family methods (window, shifted_window, halo, cross_shaped,
multi_axis, criss_cross, axial, hilo) against brute-force masks built by loops over
pixel positions — written from the papers' own constructions (Swin's roll and
``img_mask`` slices, HaloNet's blocks, MaxViT's reshape), not from the methods' index
arithmetic — on odd grids, windows and shifts that do not divide the grid; the padding
rules; degenerate grids; the sizing hooks; errors; no N×N on the fast paths; the LePE
layer; the ``corners`` task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.bench.tasks import suite
from attnzoo.bench.tasks.vision import corners
from attnzoo.kernels import grid2d
from attnzoo.layers import CrossShapedAttention

from helpers import LargestTensor

METHODS = ["window", "shifted_window", "halo", "cross_shaped", "multi_axis", "criss_cross", "axial", "hilo"]


def qkv(N, Hq=4, Hkv=2, D=8, Dv=6, B=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, N, D, generator=g, dtype=dtype), torch.randn(B, Hkv, N, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, N, Dv, generator=g, dtype=dtype))


def dense(q, k, v, allowed, key_mask=None, scale=None):
    """Softmax over the allowed keys, float64: allowed (Hq|1, N, N) or (B, Hq, N, N)."""
    Hq = q.shape[1]
    kk, vv = k.repeat_interleave(Hq // k.shape[1], 1), v.repeat_interleave(Hq // v.shape[1], 1)
    s = (q @ kk.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    ok = allowed if key_mask is None else allowed & key_mask[:, None, None, :]
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    return p @ vv


def pairs_mask(N, groups_of_cells):
    """(N, N) bool: every pair of token ids inside each group (ids < 0 are padding)."""
    m = torch.zeros(N, N, dtype=torch.bool)
    for cells in groups_of_cells:
        real = [t for t in cells if t >= 0]
        for a in real:
            for b in real:
                m[a, b] = True
    return m


def padded_ids(H, W, Hp, Wp):
    ids = torch.full((Hp, Wp), -1, dtype=torch.long)
    ids[:H, :W] = torch.arange(H * W).view(H, W)
    return ids


def window_truth(H, W, wh, ww):
    """Swin's window_partition of the padded id map, by loops over the windows."""
    wh, ww = min(wh, H), min(ww, W)
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    ids = padded_ids(H, W, Hp, Wp)
    groups = [[int(ids[r, c]) for r in range(i, i + wh) for c in range(j, j + ww)]
              for i in range(0, Hp, wh) for j in range(0, Wp, ww)]
    return pairs_mask(H * W, groups)


def swin_shifted_truth(H, W, wh, ww, sh, sw):
    """Swin's SW-MSA as its code computes it: pad, torch.roll by (-sh, -sw), img_mask from
    h_slices / w_slices, window partition, same label within a window."""
    if wh >= H:
        wh, sh = H, 0
    if ww >= W:
        ww, sw = W, 0
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    rolled = torch.roll(padded_ids(H, W, Hp, Wp), shifts=(-sh, -sw), dims=(0, 1))
    img_mask = torch.zeros(Hp, Wp, dtype=torch.long)
    hs = (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)) if sh else (slice(0, None),)
    ws = (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)) if sw else (slice(0, None),)
    cnt = 0
    for a in hs:
        for b in ws:
            img_mask[a, b] = cnt
            cnt += 1
    m = torch.zeros(H * W, H * W, dtype=torch.bool)
    for i in range(0, Hp, wh):
        for j in range(0, Wp, ww):
            cells = [(r, c) for r in range(i, i + wh) for c in range(j, j + ww)]
            for a in cells:
                for b in cells:
                    ta, tb = int(rolled[a]), int(rolled[b])
                    if ta >= 0 and tb >= 0 and img_mask[a] == img_mask[b]:
                        m[ta, tb] = True
    return m


def halo_truth(H, W, bh, bw, hh, hw):
    bh, bw = min(bh, H), min(bw, W)
    m = torch.zeros(H * W, H * W, dtype=torch.bool)
    for i in range(0, H, bh):
        for j in range(0, W, bw):
            queries = [r * W + c for r in range(i, min(H, i + bh)) for c in range(j, min(W, j + bw))]
            keys = [r * W + c for r in range(max(0, i - hh), min(H, i + bh + hh))
                    for c in range(max(0, j - hw), min(W, j + bw + hw))]
            for a in queries:
                for b in keys:
                    m[a, b] = True
    return m


def maxvit_grid_truth(H, W, gh, gw):
    """MaxViT's grid partition: (Hp, Wp) -> (G, Hp/G, G, Wp/G), attention along the G×G axis."""
    gh, gw = min(gh, H), min(gw, W)
    Hp, Wp = math.ceil(H / gh) * gh, math.ceil(W / gw) * gw
    ids = padded_ids(H, W, Hp, Wp).view(gh, Hp // gh, gw, Wp // gw).permute(1, 3, 0, 2).reshape(-1, gh * gw)
    return pairs_mask(H * W, ids.tolist())


def stripes_truth(H, W, sw, horizontal: bool):
    groups = []
    if horizontal:
        for i in range(0, H, sw):
            groups.append([r * W + c for r in range(i, min(H, i + sw)) for c in range(W)])
    else:
        for j in range(0, W, sw):
            groups.append([r * W + c for r in range(H) for c in range(j, min(W, j + sw))])
    return pairs_mask(H * W, groups)


def row_col_truth(H, W):
    rows = pairs_mask(H * W, [[r * W + c for c in range(W)] for r in range(H)])
    cols = pairs_mask(H * W, [[r * W + c for r in range(H)] for c in range(W)])
    return rows, cols


def per_head(masks):
    return torch.stack(masks).unsqueeze(0)  # (1, Hq, N, N)


def fast_and_reference(method, q, k, v, **kw):
    spec = az.get(method)
    return [az.attention(q, k, v, method=method, impl=impl, **kw) for impl in ("reference", spec.impls[0].name)]


def check_all(method, expected, q, k, v, tol=1e-10, **kw):
    for out in fast_and_reference(method, q, k, v, **kw):
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


# ------------------------------------------------------------------- brute-force masks


@pytest.mark.parametrize("grid,ws", [((7, 9), (3, 4)), ((9, 7), 4), ((5, 11), (2, 5)), ((7, 9), 7), ((1, 13), (1, 5)),
                                     ((13, 1), 4), ((3, 3), 5)])
def test_window_is_swins_partition_of_the_padded_grid(grid, ws):
    H, W = grid
    q, k, v = qkv(H * W)
    wh, ww = ws if isinstance(ws, tuple) else (ws, ws)
    check_all("window", dense(q, k, v, window_truth(H, W, wh, ww)), q, k, v, grid=grid, window_size=ws)


@pytest.mark.parametrize("grid,ws,shift", [((7, 9), (3, 4), (1, 2)), ((9, 7), 4, (3, 1)), ((7, 9), 4, None),
                                           ((5, 11), (2, 5), (1, 3)), ((11, 5), 3, 2), ((1, 13), (1, 5), (0, 2)),
                                           ((7, 7), (7, 3), (3, 1)), ((8, 8), 4, 2)])
def test_shifted_window_is_swins_roll_and_region_mask(grid, ws, shift):
    """Windows and shifts that do not divide the grid (and one that does), against Swin's
    own construction: pad, roll, img_mask slices, partition."""
    H, W = grid
    q, k, v = qkv(H * W)
    wh, ww = ws if isinstance(ws, tuple) else (ws, ws)
    sh, sw = (wh // 2, ww // 2) if shift is None else (shift if isinstance(shift, tuple) else (shift, shift))
    truth = swin_shifted_truth(H, W, wh, ww, sh, sw)
    check_all("shifted_window", dense(q, k, v, truth), q, k, v, grid=grid, window_size=ws, shift_size=shift)
    if (sh and wh < H) or (sw and ww < W):  # a real shift changes the pattern
        assert not torch.equal(truth, window_truth(H, W, wh, ww))


def test_shifted_window_equals_rolled_window_attention_when_the_windows_divide():
    """Swin's recipe end to end: roll the tokens, window attention with the region mask,
    roll back; on a grid the windows divide, no padding is involved."""
    H, W, w, s = 8, 12, 4, 2
    q, k, v = qkv(H * W, Hq=2, Hkv=2)
    roll = lambda x, sh: grid2d.cyclic_shift(x, (H, W), (sh, sh))  # noqa: E731
    lab = grid2d.region_ids(H, W, (w, w), (s, s)).view(-1)
    rolled_windows = window_truth(H, W, w, w) & (lab[:, None] == lab[None, :])
    out = dense(roll(q, s), roll(k, s), roll(v, s), rolled_windows)
    expected = roll(out, -s)
    check_all("shifted_window", expected, q, k, v, grid=(H, W), window_size=w, shift_size=s)


@pytest.mark.parametrize("grid,block,halo", [((7, 9), (3, 4), (1, 2)), ((9, 7), 2, 1), ((5, 11), (4, 3), (2, 0)),
                                             ((1, 13), (1, 4), (1, 3)), ((6, 6), 3, 3)])
def test_halo_is_blocked_queries_over_haloed_keys(grid, block, halo):
    H, W = grid
    q, k, v = qkv(H * W)
    (bh, bw), (hh, hw) = [(x, x) if isinstance(x, int) else x for x in (block, halo)]
    check_all("halo", dense(q, k, v, halo_truth(H, W, bh, bw, hh, hw)), q, k, v, grid=grid, block_size=block,
              halo_size=halo)


def test_halo_zero_is_window_and_keys_are_not_centred():
    H, W = 7, 9
    q, k, v = qkv(H * W)
    a = az.attention(q, k, v, method="halo", impl="blocked", grid=(H, W), block_size=(3, 4), halo_size=0)
    b = az.attention(q, k, v, method="window", impl="partition", grid=(H, W), window_size=(3, 4))
    torch.testing.assert_close(a, b)
    m = halo_truth(H, W, 3, 3, 1, 1)
    assert m[0].sum() == 4 * 4 and m[4 * W + 4].sum() == 5 * 5  # a corner block's halo leaves the image


@pytest.mark.parametrize("grid,sw,Hq,Hkv", [((7, 9), 2, 4, 2), ((9, 7), 4, 3, 1), ((5, 11), 3, 2, 2),
                                           ((1, 13), 2, 4, 4),
                                           ((6, 10), 7, 5, 5)])
def test_cross_shaped_heads_split_between_stripes(grid, sw, Hq, Hkv):
    H, W = grid
    q, k, v = qkv(H * W, Hq=Hq, Hkv=Hkv)
    hh = (Hq + 1) // 2
    horizontal, vertical = stripes_truth(H, W, min(sw, H), True), stripes_truth(H, W, min(sw, W), False)
    allowed = per_head([horizontal] * hh + [vertical] * (Hq - hh))
    check_all("cross_shaped", dense(q, k, v, allowed), q, k, v, grid=grid, stripe_width=sw)


@pytest.mark.parametrize("grid,P,G", [((7, 9), 3, 3), ((9, 7), (4, 2), (2, 3)), ((5, 11), 2, 4), ((8, 8), 4, 4),
                                      ((1, 13), 3, 5)])
@pytest.mark.parametrize("mode", ["split", "block", "grid"])
def test_multi_axis_block_and_grid_attention(grid, P, G, mode):
    H, W = grid
    Hq = 4
    q, k, v = qkv(H * W, Hq=Hq)
    (ph, pw), (gh, gw) = [(x, x) if isinstance(x, int) else x for x in (P, G)]
    block, dil = window_truth(H, W, ph, pw), maxvit_grid_truth(H, W, gh, gw)
    nb = {"split": 2, "block": 4, "grid": 0}[mode]
    allowed = per_head([block] * nb + [dil] * (Hq - nb))
    check_all("multi_axis", dense(q, k, v, allowed), q, k, v, grid=grid, block_size=P, grid_size=G, mode=mode)


def test_maxvit_grid_attention_is_dilated_and_global():
    dil = maxvit_grid_truth(14, 14, 7, 7)  # stride 2: the 7 × 7 cells of one parity class
    assert dil[0].sum() == 49 and dil[0, 2] and dil[0, 12 * 14 + 12] and not dil[0, 1]


@pytest.mark.parametrize("grid", [(7, 9), (5, 11), (1, 13), (13, 1), (4, 4)])
@pytest.mark.parametrize("passes", [1, 2])
def test_criss_cross_row_and_column_under_one_softmax(grid, passes):
    H, W = grid
    q, k, v = qkv(H * W)
    rows, cols = row_col_truth(H, W)
    A_dense = dense(q, k, torch.eye(H * W, dtype=q.dtype).expand(2, 2, -1, -1), rows | cols)  # the weights A
    expected = A_dense @ v.repeat_interleave(2, 1)
    if passes == 2:
        expected = A_dense @ expected
    check_all("criss_cross", expected, q, k, v, grid=grid, passes=passes)
    assert (rows | cols)[0].sum() == H + W - 1  # the pixel itself once


def test_criss_cross_two_passes_reach_every_pixel():
    q, k, v = qkv(35, Hq=2, Hkv=2, B=1)
    _, w1 = az.attention(q, k, v, method="criss_cross", grid=(5, 7), return_weights=True)
    _, w2 = az.attention(q, k, v, method="criss_cross", grid=(5, 7), passes=2, return_weights=True)
    assert int((w1[0, 0] > 0).sum(-1).max()) == 5 + 7 - 1 and bool((w2 > 0).all())


@pytest.mark.parametrize("grid", [(7, 9), (5, 11), (1, 13), (4, 4)])
@pytest.mark.parametrize("mode", ["row_column", "row", "column", "split"])
def test_axial_rows_then_columns(grid, mode):
    H, W = grid
    q, k, v = qkv(H * W)
    rows, cols = row_col_truth(H, W)
    if mode == "row_column":
        eye = torch.eye(H * W, dtype=q.dtype).expand(2, 2, -1, -1)
        A_row, A_col = dense(q, k, eye, rows), dense(q, k, eye, cols)
        expected = A_col @ (A_row @ v.repeat_interleave(2, 1))
    else:
        masks = {"row": [rows] * 4, "column": [cols] * 4, "split": [rows, rows, cols, cols]}[mode]
        expected = dense(q, k, v, per_head(masks))
    check_all("axial", expected, q, k, v, grid=grid, mode=mode)


def hilo_truth(q, k, v, H, W, size, alpha, key_mask=None):
    """HiLo by loops: Hi-Fi heads over s × s windows, Lo-Fi heads over the averages of the
    s × s cells (ceil mode, real keys only)."""
    Hq = q.shape[1]
    nlo = int(Hq * alpha)
    nhi = Hq - nlo
    sh, sw = min(size[0], H), min(size[1], W)
    kk, vv = k.repeat_interleave(Hq // k.shape[1], 1), v.repeat_interleave(Hq // v.shape[1], 1)
    outs = []
    if nhi:
        outs.append(dense(q[:, :nhi], kk[:, :nhi], vv[:, :nhi], window_truth(H, W, sh, sw), key_mask))
    if nlo:
        B = q.shape[0]
        km = torch.ones(B, H * W, dtype=torch.bool) if key_mask is None else key_mask
        cells = [[r * W + c for r in range(i, min(H, i + sh)) for c in range(j, min(W, j + sw))]
                 for i in range(0, H, sh) for j in range(0, W, sw)]
        kp = torch.zeros(B, nlo, len(cells), k.shape[-1], dtype=q.dtype)
        vp = torch.zeros(B, nlo, len(cells), v.shape[-1], dtype=q.dtype)
        real = torch.zeros(B, len(cells), dtype=torch.bool)
        for b in range(B):
            for m, cell in enumerate(cells):
                ids = [t for t in cell if km[b, t]]
                if ids:
                    kp[b, :, m] = kk[b, nhi:, ids].mean(1)
                    vp[b, :, m] = vv[b, nhi:, ids].mean(1)
                    real[b, m] = True
        outs.append(dense(q[:, nhi:], kp, vp, torch.ones(1, 1, H * W, len(cells), dtype=torch.bool), real))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("grid,s", [((7, 9), 2), ((9, 7), 3), ((5, 11), (2, 4)), ((1, 13), 2), ((8, 8), 2)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_hilo_hifi_windows_and_lofi_pooled_keys(grid, s, alpha):
    H, W = grid
    q, k, v = qkv(H * W, Hq=4, Hkv=2)
    kpm = torch.ones(2, H * W, dtype=torch.bool)
    kpm[1, -(H * W) // 3:] = False
    size = (s, s) if isinstance(s, int) else s
    check_all("hilo", hilo_truth(q, k, v, H, W, size, alpha, kpm), q, k, v, grid=grid, window_size=s, alpha=alpha,
              key_mask=kpm)


def test_hilo_head_split_follows_litv2():
    from attnzoo.methods.vision.hilo import lofi_heads

    assert [lofi_heads(h, 0.9) for h in (1, 2, 4, 8, 12)] == [0, 1, 3, 7, 10]
    q, k, v = qkv(63, Hq=4, Hkv=2)
    only_hi = az.attention(q, k, v, method="hilo", grid=(7, 9), window_size=2, alpha=0.0)
    torch.testing.assert_close(only_hi, az.attention(q, k, v, method="window", grid=(7, 9), window_size=2))


def test_pool_tokens_is_the_averaging_matrix():
    x = torch.randn(2, 3, 7 * 9, 4, dtype=torch.float64)
    km = torch.rand(2, 63, generator=torch.Generator().manual_seed(1)) < 0.5
    km[0, :] = False  # a batch row with no real token: every cell masked
    for size in ((2, 2), (3, 4), (7, 9), (1, 9)):
        pooled, real, cells = grid2d.pool_tokens(x, (7, 9), size, km)
        P = grid2d.pool_matrix((7, 9), size, key_mask=km)
        torch.testing.assert_close(pooled, P.unsqueeze(1) @ x)
        assert cells == (math.ceil(7 / size[0]), math.ceil(9 / size[1])) and not real[0].any()
        assert torch.equal(real, P.sum(-1) > 0)
    pooled, _, _ = grid2d.pool_tokens(x, (7, 9), (2, 2))
    torch.testing.assert_close(pooled[:, :, -1], x[:, :, -1])  # the corner cell of a 7 × 9 grid holds one token


# ------------------------------------------------------ masks, padding, GQA, score_mods


@pytest.mark.parametrize("method,opts", [("window", {"window_size": (3, 4)}),
                                         ("shifted_window", {"window_size": 4, "shift_size": (1, 3)}),
                                         ("halo", {"block_size": 3, "halo_size": 1}),
                                         ("cross_shaped", {"stripe_width": 2}),
                                         ("multi_axis", {"block_size": 3, "grid_size": 3}),
                                         ("criss_cross", {}), ("axial", {"mode": "split"})])
def test_dense_masks_key_padding_and_float_masks_at_the_gathered_pairs(method, opts):
    """A dense bool mask (with fully masked rows), key padding and a float bias (with a
    row of -inf): the fast form equals the reference, rows with nothing give zeros."""
    H, W = 7, 9
    N = H * W
    q, k, v = qkv(N, Hq=4, Hkv=2)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 4, N, N, generator=g) < 0.6
    mask[:, :, ::11] = False
    kpm = torch.ones(2, N, dtype=torch.bool)
    kpm[0, 40:] = False
    bias = torch.randn(1, 4, N, N, generator=g, dtype=torch.float64)
    bias[:, :, 5] = float("-inf")
    ref, fast = az.get(method).impl_names[0], az.get(method).impls[0].name
    for kw in ({"mask": mask, "key_mask": kpm}, {"attn_mask": bias}, {"attn_mask": bias, "key_mask": kpm}):
        a = az.attention(q, k, v, method=method, impl=ref, grid=(H, W), **opts, **kw)
        b = az.attention(q, k, v, method=method, impl=fast, grid=(H, W), **opts, **kw)
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)
        assert torch.isfinite(b).all()
    out = az.attention(q, k, v, method=method, impl=fast, grid=(H, W), mask=mask, **opts)
    assert bool((out[:, :, ::11] == 0).all())
    out = az.attention(q, k, v, method=method, impl=fast, grid=(H, W), attn_mask=bias, **opts)
    assert bool((out[:, :, 5] == 0).all())


def test_padded_cells_are_absent_not_zero_tokens():
    """7 × 9 with 4 × 4 windows pads to 8 × 12: the bottom-right window holds the real cells
    (4..6, 8) only, so the last token attends to exactly those 3 × 1 cells."""
    q, k, v = qkv(63, Hq=2, Hkv=2)
    _, w = az.attention(q, k, v, method="window", grid=(7, 9), window_size=4, return_weights=True)
    seen = (w[0, 0, 62] > 0).nonzero().flatten().tolist()
    assert seen == [4 * 9 + 8, 5 * 9 + 8, 6 * 9 + 8]
    out = az.attention(q, k, v, method="window", impl="partition", grid=(7, 9), window_size=4)
    torch.testing.assert_close(out, az.attention(q, k, v, method="window", grid=(7, 9), window_size=4))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 2, 37, 63, 100, 120, 1000])
def test_sizing_hook_gives_a_grid_that_fits_and_every_method_runs_on_it(method, n):
    spec = az.get(method)
    opts = spec.sized_options(n)
    H, W = opts["grid"]
    assert H * W == n and H <= W and (n not in (2, 37) or H == 1)
    assert opts["grid"] == grid2d.square_grid(n)
    if n <= 120:
        q, k, v = qkv(n, B=1)
        a, b = fast_and_reference(method, q, k, v, **opts)
        torch.testing.assert_close(a, b)


def test_sizing_at_the_papers_resolutions():
    n = 56 * 56
    assert az.get("window").sized_options(n) == {"grid": (56, 56), "window_size": (7, 7)}
    assert az.get("halo").sized_options(n) == {"grid": (56, 56), "block_size": (8, 8), "halo_size": (3, 3)}
    assert az.get("multi_axis").sized_options(112 * 112)["grid_size"] == (7, 7)
    assert az.get("cross_shaped").sized_options(n)["stripe_width"] == 7
    assert az.get("hilo").sized_options(n)["window_size"] == 2
    assert grid2d.square_grid(1000) == (25, 40) and grid2d.square_grid(97) == (1, 97)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("method", METHODS)
def test_grid_missing_or_wrong_raises_clearly(method):
    q, k, v = qkv(63)
    with pytest.raises(az.AttentionInputError, match=r"pass grid=\(H, W\).*Nq = 63.*grid=\(7, 9\)"):
        az.attention(q, k, v, method=method)
    with pytest.raises(az.AttentionInputError, match=r"grid=\(8, 8\) has 64 cells but q has Nq=63"):
        az.attention(q, k, v, method=method, grid=(8, 8))
    with pytest.raises(az.AttentionInputError, match="grid"):
        az.attention(q, k, v, method=method, grid=(7, 0))
    with pytest.raises(az.UnsupportedPattern, match="noncausal_self"):
        az.attention(q, k, v, method=method, grid=(7, 9), causal=True)
    with pytest.raises(az.UnsupportedPattern, match="noncausal_self"):
        az.attention(q, k[:, :, :40], v[:, :, :40], method=method, grid=(7, 9))


def test_bad_sizes_raise():
    q, k, v = qkv(63)
    with pytest.raises(az.AttentionInputError, match=r"0 <= shift < window_size"):
        az.attention(q, k, v, method="shifted_window", grid=(7, 9), window_size=4, shift_size=4)
    with pytest.raises(az.AttentionInputError, match="window_size"):
        az.attention(q, k, v, method="window", grid=(7, 9), window_size=0)
    with pytest.raises(az.AttentionInputError, match="alpha"):
        az.attention(q, k, v, method="hilo", grid=(7, 9), alpha=1.5)
    with pytest.raises(az.AttentionInputError, match="stripe_width"):
        az.attention(q, k, v, method="cross_shaped", grid=(7, 9), stripe_width=0)
    with pytest.raises(az.AttentionInputError, match="mode"):
        az.attention(q, k, v, method="multi_axis", grid=(7, 9), mode="both")
    with pytest.raises(az.AttentionInputError, match="mask"):
        az.attention(q, k, v, method="hilo", grid=(7, 9), mask=torch.ones(63, 63, dtype=torch.bool))


# ------------------------------------------------------------------------ no N × N


@pytest.mark.parametrize("method", METHODS)
def test_fast_forms_never_build_n_by_n(method):
    """Forward and backward at 48 × 48 (N = 2304) with key padding: no tensor near N² (the
    local forms are O(N·window), the row/column forms O(N·(H + W)))."""
    spec = az.get(method)
    N = 48 * 48
    opts = spec.sized_options(N)
    q, k, v = (t.float().requires_grad_(True) for t in qkv(N, Hq=4, Hkv=2, D=16, Dv=16, B=1))
    km = torch.ones(1, N, dtype=torch.bool)
    km[0, -200:] = False
    with LargestTensor() as probe:
        out = az.attention(q, k, v, method=method, impl=spec.impls[0].name, key_mask=km, **opts)
        out.sum().backward()
    assert probe.largest < N * N // 4, (method, probe.largest)


# --------------------------------------------------------------------------- layer


def test_lepe_is_a_depthwise_conv_inside_each_stripe():
    torch.manual_seed(0)
    H, W, sw = 5, 7, 2
    layer = CrossShapedAttention(16, 4, (H, W), stripe_width=sw).double()
    x = torch.randn(2, H * W, 16, dtype=torch.float64)
    B, N = 2, H * W
    q, k, v = layer.qkv(x).view(B, N, 3, 4, 4).permute(2, 0, 3, 1, 4)
    attn = az.attention(q, k, v, method="cross_shaped", grid=(H, W), stripe_width=sw)
    parts = []
    for branch, (conv, heads) in enumerate(((layer.lepe_h, slice(0, 2)), (layer.lepe_v, slice(2, 4)))):
        vb = v[:, heads].permute(0, 1, 3, 2).reshape(B, 8, H, W)  # channels: head·d_head + d
        y = torch.zeros_like(vb)
        for s in (range(0, H, sw) if branch == 0 else range(0, W, sw)):  # each stripe alone, zero-padded
            if branch == 0:
                y[:, :, s:s + sw] = F.conv2d(vb[:, :, s:s + sw], conv.weight, conv.bias, padding=1, groups=8)
            else:
                y[:, :, :, s:s + sw] = F.conv2d(vb[:, :, :, s:s + sw], conv.weight, conv.bias, padding=1, groups=8)
        parts.append(y.view(B, 2, 4, N).permute(0, 1, 3, 2))
    lepe = torch.cat(parts, 1)
    expected = layer.proj((attn + lepe).transpose(1, 2).reshape(B, N, 16))
    torch.testing.assert_close(layer(x), expected)
    plain = CrossShapedAttention(16, 4, (H, W), stripe_width=sw, lepe=False).double()
    plain.load_state_dict({n: p for n, p in layer.state_dict().items() if not n.startswith("lepe")})
    torch.testing.assert_close(plain(x), layer.proj(attn.transpose(1, 2).reshape(B, N, 16)))
    with pytest.raises(az.AttentionInputError, match=r"\(B, 35, 16\)"):
        layer(x[:, :30])


# ---------------------------------------------------------------------------- task


def test_corners_task_data():
    d = corners(512, 256, 4, seed=3)
    img = d["inputs"].view(512, 16, 16)
    assert torch.equal(d["inputs"], corners(512, 256, 4, seed=3)["inputs"])
    coloured = (img > 0).nonzero()
    assert coloured.shape[0] == 2 * 512  # two coloured pixels per image
    tl, br = img[:, :4, :4], img[:, 12:, 12:]
    assert bool(((tl > 0).sum((1, 2)) == 1).all() and ((br > 0).sum((1, 2)) == 1).all())
    same = tl.amax((1, 2)) == br.amax((1, 2))
    assert torch.equal(same.long(), d["labels"]) and 0.4 < d["labels"].float().mean() < 0.6
    assert suite.TASKS["corners"].chance(4) == 0.5 and suite.TASK_PATTERNS["corners"] == "noncausal_self"
    with pytest.raises(az.AttentionInputError, match="2-D image"):
        corners(2, 37, 4)
    cases = suite.build_task_cases({"tasks": ["corners"]}, ["softmax", "window", "sliding_window"])
    assert [c.seq_len for c in cases] == [256] * 3


@pytest.mark.slow
def test_corners_is_learnt_by_softmax_not_by_a_tiny_window():
    """8 × 8 images (the task at its smallest), 200 steps: softmax reaches the far corner,
    2 × 2 windows cannot (they never exchange information, whatever the depth)."""
    common = dict(task="corners", seq_len=64, vocab_size=4, steps=200, eval_examples=256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark's workers run them (and deterministic)
    try:
        soft = suite.run_task(suite.TaskCase(method="softmax", impl="sdpa", **common))
        tiny = suite.run_task(suite.TaskCase(method="window", impl="partition", options=(("window_size", 2),),
                                             **common))
    finally:
        torch.set_num_threads(threads)
    assert soft["accuracy"] > 0.95, soft
    assert tiny["accuracy"] < 0.65 and tuple(tiny["options"]["grid"]) == (8, 8), tiny
