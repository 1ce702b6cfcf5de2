import logging
from itertools import islice

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from infd import geometry
from infd.data import WALLPAPER_HOLDOUT, DataConfig, MixedResolutionDataset, StepBatchSampler, crop_start, list_images, make_sample, min_target_scale, target_resolution
from infd.errors import InfdError

SMALL = DataConfig(input_size=16, crop_size=16)


def smooth_field(coord: torch.Tensor) -> torch.Tensor:
    """An analytic image: coord (..., 2) of (y, x) -> (..., 3) in [0.25, 0.75]."""
    y, x = coord[..., 0:1].double(), coord[..., 1:2].double()
    phase = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    return 0.5 + 0.25 * torch.sin(3 * y + phase) * torch.cos(2 * x + phase)


def write_field(path, h: int, w: int):
    """The field sampled at the native pixel centers, as a 16-bit RGB TIFF (quantisation ~1e-5)."""
    values = smooth_field(geometry.coord_grid(geometry.Box.full(), (h, w)))
    tifffile.imwrite(path, np.round(values.numpy() * 65535).astype(np.uint16), photometric="rgb")
    return path


def write_gray16_field(path, h: int, w: int):
    """Channel 0 of the field as a 16-bit grayscale PNG."""
    values = smooth_field(geometry.coord_grid(geometry.Box.full(), (h, w)))[..., 0]
    Image.fromarray(np.round(values.numpy() * 65535).astype(np.uint16)).save(path)
    return path


def write_flat(path, h: int, w: int, value: int):
    Image.new("RGB", (w, h), (value, value, value)).save(path)
    return path


ALIGNMENT_TOLERANCE = 0.006  # observed error ~0.002; a half-pixel misalignment gives 0.01-0.03


def alignment_error(sample, channels=slice(None), shift=(0.0, 0.0)) -> float:
    """Max |gt - field at the sample's pixel centers (+ shift in target pixels)|, in [0, 1] units."""
    cell = sample["cell"].double()
    coord = sample["coord"].double() + torch.tensor(shift, dtype=torch.float64) * cell
    expected = smooth_field(coord)[..., channels].permute(2, 0, 1)
    return ((sample["gt"][channels].double() + 1) / 2 - expected).abs().max().item()


def assert_aligned(sample, channels=slice(None)):
    assert alignment_error(sample, channels) < ALIGNMENT_TOLERANCE


# ---------------------------------------------------------------------------- alignment


@pytest.mark.parametrize(("h", "w", "aspect"), [(48, 80, "squash"), (80, 40, "squash"), (56, 56, "crop")])
def test_gt_matches_the_field_at_coord(tmp_path, h, w, aspect):
    write_field(tmp_path / "field.tif", h, w)
    ds = MixedResolutionDataset(tmp_path, DataConfig(input_size=16, crop_size=16, aspect=aspect), seed=3)
    samples = [ds[counter] for counter in range(40)]
    for sample in samples:
        assert_aligned(sample)
    assert len({tuple(s["size"].tolist()) for s in samples}) > 5  # many target resolutions exercised
    # The test has the power to see a half-pixel error, in y and in x.
    assert max(alignment_error(s, shift=(0.5, 0)) for s in samples) > ALIGNMENT_TOLERANCE
    assert max(alignment_error(s, shift=(0, 0.5)) for s in samples) > ALIGNMENT_TOLERANCE


def test_gt_alignment_from_16bit_png(tmp_path):
    write_gray16_field(tmp_path / "field.png", 50, 70)
    ds = MixedResolutionDataset(tmp_path, SMALL)
    for counter in range(20):
        sample = ds[counter]
        assert torch.equal(sample["gt"][0], sample["gt"][1])
        assert_aligned(sample, channels=slice(0, 1))


def test_native_resolution_uses_native_pixels(tmp_path):
    write_field(tmp_path / "field.tif", 16, 16)  # crop == image: no downsampling possible
    sample = MixedResolutionDataset(tmp_path, SMALL)[0]
    assert sample["size"].tolist() == [16, 16]
    native = torch.from_numpy(tifffile.imread(tmp_path / "field.tif").astype(np.float32) / 65535).permute(2, 0, 1)
    assert torch.allclose((sample["gt"] + 1) / 2, native, atol=1e-6)


def test_coord_and_cell_follow_geometry(tmp_path):
    write_field(tmp_path / "field.tif", 40, 64)
    ds = MixedResolutionDataset(tmp_path, SMALL)
    for counter in range(10):
        sample = ds[counter]
        rh, rw = sample["size"].tolist()
        top, left = sample["window"].tolist()
        assert sample["cell"].dtype == torch.float32
        assert torch.equal(sample["cell"], torch.tensor([2 / rh, 2 / rw], dtype=torch.float32))
        box = geometry.crop_box((rh, rw), top, left, (16, 16))
        assert torch.equal(sample["coord"], geometry.coord_grid(box, (16, 16)))


@pytest.mark.parametrize("aspect", ["squash", "crop"])
def test_non_square_shapes(tmp_path, aspect):
    write_field(tmp_path / "wide.tif", 24, 72)
    ds = MixedResolutionDataset(tmp_path, DataConfig(input_size=12, crop_size=16, aspect=aspect))
    for counter in range(8):
        sample = ds[counter]
        assert sample["inp"].shape == (3, 12, 12) and sample["gt"].shape == (3, 16, 16)
        assert sample["coord"].shape == (16, 16, 2) and sample["inp"].min() >= -1 and sample["gt"].max() <= 1
        rh, rw = sample["size"].tolist()
        if aspect == "squash":
            assert rw > rh and sample["cell"][0] > sample["cell"][1]  # anisotropic cells
            assert rh <= 24 and rw <= 72
        else:
            assert rh == rw <= 24 and sample["cell"][0] == sample["cell"][1]


# ---------------------------------------------------------------------------- determinism


@pytest.fixture
def folder(tmp_path):
    for k in range(5):
        write_flat(tmp_path / f"img{k}.png", 24 + 4 * k, 40, 40 * k + 10)
    return tmp_path


def test_sample_is_a_function_of_seed_and_counter(folder):
    a, b = MixedResolutionDataset(folder, SMALL, seed=7), MixedResolutionDataset(folder, SMALL, seed=7)
    for counter in (0, 3, 12, 1000):
        x, y = a[counter], b[counter]
        assert x.keys() == y.keys() and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)
    b[999]  # touching other counters first changes nothing
    assert torch.equal(a[3]["gt"], b[3]["gt"])


def test_different_counters_and_seeds_differ(tmp_path):
    write_field(tmp_path / "field.tif", 64, 64)
    ds = MixedResolutionDataset(tmp_path, SMALL, seed=0)
    windows = {(tuple(ds[c]["size"].tolist()), tuple(ds[c]["window"].tolist())) for c in range(10)}
    assert len(windows) == 10
    other = MixedResolutionDataset(tmp_path, SMALL, seed=1)
    assert not torch.equal(ds[0]["gt"], other[0]["gt"])


def test_each_epoch_is_a_permutation(folder):
    ds = MixedResolutionDataset(folder, SMALL, seed=1)
    n = len(ds)
    assert n == 5
    orders = []
    for epoch in range(3):
        order = [ds.image_index(c) for c in range(epoch * n, (epoch + 1) * n)]
        assert sorted(order) == list(range(n))
        # The flat images tell which file a sample came from, independently of image_index.
        seen = [round(((ds[c]["inp"].mean().item() + 1) / 2 * 255 - 10) / 40) for c in range(epoch * n, (epoch + 1) * n)]
        assert seen == order
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1  # epochs are reshuffled


# ---------------------------------------------------------------------------- bad files


def test_unusable_files_are_skipped_at_init(folder, caplog):
    (folder / "garbage.jpg").write_bytes(b"not an image at all" * 50)
    good = (folder / "img0.png").read_bytes()
    (folder / "cut.png").write_bytes(good[:20])  # header gone
    write_flat(folder / "small.png", 10, 40, 0)  # a side below crop_size
    write_flat(folder / "tiny.png", 1, 1, 0)
    write_flat(folder / "huge.png", 60, 60, 0)
    with caplog.at_level(logging.WARNING, logger="infd.data"):
        ds = MixedResolutionDataset(folder, DataConfig(input_size=16, crop_size=16, max_pixels=3000))
    assert len(ds) == 5
    assert ds.skipped == {"unreadable": 2, "too small": 2, "too many pixels": 1}
    assert sorted(name.rsplit("/", 1)[-1] for name, _ in ds.skipped_files) == [
        "cut.png", "garbage.jpg", "huge.png", "small.png", "tiny.png"
    ]
    assert "skipped 5 of 10" in caplog.text


def test_nothing_usable_says_why(tmp_path):
    write_flat(tmp_path / "small.png", 10, 10, 0)
    with pytest.raises(InfdError, match="1 too small"):
        MixedResolutionDataset(tmp_path, SMALL)


def test_file_corrupted_after_init_is_replaced(folder, caplog):
    ds = MixedResolutionDataset(folder, SMALL, seed=2)
    victim = ds.image_index(3)
    data = ds.paths[victim].read_bytes()
    ds.paths[victim].write_bytes(data[: len(data) // 2])  # truncated: the header still reads
    with caplog.at_level(logging.WARNING, logger="infd.data"):
        samples = [ds[c] for c in range(10)]
    failed = [s["failed"] for s in samples]
    assert sum(failed[:5]) == sum(failed[5:]) == 1  # once per epoch: where the permutation hits it
    assert failed[3] == 1 and str(ds.paths[victim]) in ds.failed_files
    fallback = ds.image_index(3, attempt=1)  # the next image of the permutation took its place
    assert round(((samples[3]["inp"].mean().item() + 1) / 2 * 255 - 10) / 40) == fallback
    assert caplog.text.count(str(ds.paths[victim])) == 1  # warned once


def test_all_files_corrupted_raises(folder):
    ds = MixedResolutionDataset(folder, SMALL)
    for path in ds.paths:
        path.write_bytes(b"garbage")
    with pytest.raises(InfdError, match="failed to decode"):
        ds[0]


# ---------------------------------------------------------------------------- listing, config


def test_list_images(tmp_path):
    for name in ["b.PNG", "a.jpg", "sub/c.TIFF", "sub/deeper/d.webp", "notes.txt", ".hidden.png", ".cache/e.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "sub/c.TIFF", "sub/deeper/d.webp"]
    with pytest.raises(InfdError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InfdError, match="no images"):
        list_images(tmp_path / "empty")


def test_exclude_and_path_lists(folder):
    ds = MixedResolutionDataset(folder, SMALL, exclude=["img1.png", "img3.png"])
    assert [p.name for p in ds.paths] == ["img0.png", "img2.png", "img4.png"]
    listed = MixedResolutionDataset([folder / "img4.png", folder / "img0.png"], SMALL)
    assert [p.name for p in listed.paths] == ["img4.png", "img0.png"]
    assert len(WALLPAPER_HOLDOUT) == 8 and all(name.endswith(".jpg") for name in WALLPAPER_HOLDOUT)


def test_cover_sampling_puts_the_border_in_as_many_crops_as_the_interior():
    """"inside" starts leave the outermost pixel in about 1/crop of the interior's crops; "cover" does not."""
    length, crop, draws = 40, 8, 20_000

    def coverage(sampling):
        generator, counts = torch.Generator().manual_seed(0), torch.zeros(length)
        for _ in range(draws):
            start = crop_start(length, crop, sampling, generator)
            assert 0 <= start <= length - crop
            counts[start : start + crop] += 1
        return counts / counts[length // 2 - 2 : length // 2 + 2].mean()

    inside, cover = coverage("inside"), coverage("cover")
    assert inside[0] < 0.2 and inside[crop // 2] < 0.7
    assert cover.min() > 0.9 and cover[0] > 0.9 and cover.max() < 2.1


@pytest.mark.parametrize(
    "kwargs", [{"input_size": 0}, {"crop_size": -3}, {"aspect": "stretch"}, {"max_pixels": 0}, {"crop_size": 2.5}, {"crop_sampling": "edges"}]
)
def test_config_validation(kwargs):
    with pytest.raises(InfdError):
        DataConfig(**kwargs)


# ---------------------------------------------------------------------------- batching


def test_step_batch_sampler():
    world = [list(islice(StepBatchSampler(4, rank=r, world_size=3), 6)) for r in range(3)]
    counters = [c for batches in world for batch in batches for c in batch]
    assert len(counters) == len(set(counters)) == 3 * 6 * 4
    assert sorted(counters) == list(range(72))  # no gaps either
    resumed = list(islice(StepBatchSampler(4, start_step=2, rank=1, world_size=3), 4))
    assert resumed == world[1][2:6]
    with pytest.raises(InfdError):
        StepBatchSampler(4, rank=3, world_size=3)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_batches_equal_samples(folder, workers):
    ds = MixedResolutionDataset(folder, SMALL, seed=5)
    loader = DataLoader(ds, batch_sampler=StepBatchSampler(3, start_step=1), num_workers=workers)
    batch = next(iter(loader))
    assert batch["inp"].shape == (3, 3, 16, 16) and batch["gt"].shape == (3, 3, 16, 16)
    assert batch["coord"].shape == (3, 16, 16, 2) and batch["size"].dtype == torch.long
    assert batch["failed"].tolist() == [0, 0, 0]
    for i, counter in enumerate([3, 4, 5]):
        assert torch.equal(batch["gt"][i], ds[counter]["gt"])


# ---------------------------------------------------------------------------- properties


native_sizes = st.tuples(st.integers(1, 4000), st.integers(1, 4000))


@given(native=native_sizes, crop=st.integers(1, 512), input_size=st.integers(1, 512), u=st.floats(0, 1))
def test_target_resolution_stays_between_crop_and_native(native, crop, input_size, u):
    h, w = native
    if min(h, w) < crop:
        return  # such images are skipped by the dataset
    lowest = min_target_scale(native, input_size, crop)
    assert 0 < lowest <= 1
    rh, rw = target_resolution(native, lowest + (1 - lowest) * u, crop)
    assert crop <= rh <= h and crop <= rw <= w
    if lowest < 1:
        # At the smallest scale the long side still reaches the encoder's input size (up to rounding).
        rh, rw = target_resolution(native, lowest, crop)
        assert max(rh, rw) >= min(input_size, max(h, w)) - 1


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(8, 60), w=st.integers(8, 60), crop=st.integers(4, 8), seed=st.integers(0, 2**31),
    aspect=st.sampled_from(["squash", "crop"]), sampling=st.sampled_from(["inside", "cover"]),
)
def test_crop_lies_inside_the_target(h, w, crop, seed, aspect, sampling):
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))
    config = DataConfig(input_size=8, crop_size=crop, aspect=aspect, crop_sampling=sampling)
    sample = make_sample(image, config, torch.Generator().manual_seed(seed))
    rh, rw = sample["size"].tolist()
    top, left = sample["window"].tolist()
    side = min(h, w) if aspect == "crop" else None
    assert crop <= rh <= (side or h) and crop <= rw <= (side or w)
    assert 0 <= top <= rh - crop and 0 <= left <= rw - crop
    assert sample["coord"].abs().max() < 1 and sample["gt"].shape == (3, crop, crop)
