"""scripts/picture_grid.py: the docs' picture of a run's first validation images."""
import importlib.util

from PIL import Image

from conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location("picture_grid", REPO_ROOT / "scripts" / "picture_grid.py")
picture_grid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(picture_grid)


def test_images_row_by_row_with_a_white_gap(tmp_path, capsys):
    paths = []
    for name, colour, size in (("a", "red", (10, 6)), ("b", "blue", (20, 12)), ("c", "lime", (10, 6))):
        Image.new("RGB", size, colour).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    out = tmp_path / "grid" / "sheet.png"
    assert picture_grid.main(paths + ["--columns", "2", "--out", str(out)]) == 0
    sheet = Image.open(out)
    assert sheet.size == (2 * 10 + 4, 2 * 6 + 4)  # b scaled to a's size; two rows
    assert sheet.getpixel((0, 0)) == (255, 0, 0) and sheet.getpixel((14, 5)) == (0, 0, 255)
    assert sheet.getpixel((11, 0)) == (255, 255, 255) and sheet.getpixel((0, 10)) == (0, 255, 0)
    assert sheet.getpixel((14, 10)) == (255, 255, 255)  # the empty cell of the second row
    assert picture_grid.main([str(tmp_path / "none.png"), "--out", str(out)]) == 2
    assert "not a file" in capsys.readouterr().err
