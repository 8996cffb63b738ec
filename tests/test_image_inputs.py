import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch

from diffusers_delta.image_inputs import pil_to_tensor, read_image_file, read_image_size, to_rgb_image


def test_rgba_is_composited_over_white():
    rgba = PIL.Image.new("RGBA", (64, 64), (10, 20, 30, 0))  # fully transparent
    assert to_rgb_image(rgba).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "image, expected",
    [
        (PIL.Image.new("L", (64, 64), 128), (128, 128, 128)),
        (PIL.Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)), (255, 255, 255)),  # 16-bit, rescaled
        (np.full((64, 64), 32896, dtype=np.uint16), (128, 128, 128)),
        (np.full((64, 64, 3), 0.5, dtype=np.float32), (128, 128, 128)),
        (torch.full((3, 64, 64), 1.0), (255, 255, 255)),
        (np.zeros((1, 64, 64, 3), dtype=np.uint8), (0, 0, 0)),
    ],
    ids=["L", "I;16", "uint16-array", "float-array", "tensor-CHW", "batched-array"],
)
def test_modes_and_types_become_rgb(image, expected):
    rgb = to_rgb_image(image)
    assert rgb.mode == "RGB" and rgb.size == (64, 64)
    assert rgb.getpixel((5, 5)) == expected


@pytest.mark.parametrize("size", [(63, 64), (64, 10)])
def test_too_small_is_refused_with_the_fix(size):
    with pytest.raises(ValueError, match="at least 64.*Upscale"):
        to_rgb_image(PIL.Image.new("RGB", size), name="query")


def test_wrong_type_and_shape_are_refused():
    with pytest.raises(TypeError, match="PIL image"):
        to_rgb_image("query.png")
    with pytest.raises(ValueError, match="shape"):
        to_rgb_image(np.zeros((64, 64, 5), dtype=np.uint8))


def test_pil_to_tensor_range_and_layout():
    tensor = pil_to_tensor(PIL.Image.new("RGB", (80, 64), (255, 0, 51)))
    assert tensor.shape == (3, 64, 80)
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


@pytest.mark.parametrize("orientation, turned", [(1, False), (3, False), (6, True), (8, True)])
def test_files_are_read_upright_as_their_exif_orientation_shows_them(tmp_path, orientation, turned):
    stored = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 96 wide, 64 high
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    PIL.Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    upright = read_image_file(tmp_path / "photo.png")
    assert upright.size == read_image_size(tmp_path / "photo.png") == ((64, 96) if turned else (96, 64))
    expected = PIL.ImageOps.exif_transpose(PIL.Image.open(tmp_path / "photo.png"))  # as load_image turns it
    assert np.array_equal(np.asarray(upright), np.asarray(expected))
