"""Pascal VOC XML annotations -> the in-memory COCO dict (the layouts: retinanet.data.formats).

One XML file per image. Its image is the file of the same stem in the images folder (what
torchvision's and detectron2's VOC readers assume), else the one its <filename> names. The size is
the XML's <size>, or the image's own when that is missing or zero.

Boxes: VOC corners are 1-based pixel indices, xmin..xmax inclusive. As detectron2 reads them,
xmin and ymin minus 1 are the 0-based box edges and xmax, ymax stay: COCO
[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1], so a 1-pixel object is 1 px wide.
`difficult` objects become crowd regions (iscrowd 1): left out of the training targets, and in
pycocotools' evaluation a detection on one is neither a true nor a false positive.
"""
from __future__ import annotations

from pathlib import Path
from xml.parsers import expat

from ..errors import MissingFileError
from .images import image_size

COORDINATES = ("xmin", "ymin", "xmax", "ymax")


class Node:
    """An XML element with the line it starts on (ElementTree keeps no line numbers)."""

    def __init__(self, tag: str, line: int):
        self.tag, self.line, self.text, self.children = tag, line, "", []

    def find(self, tag: str) -> "Node | None":
        return next((c for c in self.children if c.tag == tag), None)

    def value(self, tag: str) -> str | None:
        node = self.find(tag)
        return None if node is None else node.text.strip()


def parse_xml(path: Path) -> Node:
    """The document element of an XML file. Raises expat.ExpatError (with .lineno) when it is
    not well-formed."""
    parser = expat.ParserCreate()
    stack = [Node("", 0)]

    def start(tag: str, _attributes: dict) -> None:
        node = Node(tag, parser.CurrentLineNumber)
        stack[-1].children.append(node)
        stack.append(node)

    def text(data: str) -> None:
        stack[-1].text += data

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda _tag: stack.pop()
    parser.CharacterDataHandler = text
    with open(path, "rb") as f:
        parser.ParseFile(f)
    return stack[0].children[0]


def xml_files(annotations: Path) -> tuple[list[Path], list[tuple[str, str, str]]]:
    """The XML files `annotations` names (an ImageSets/Main list, a VOC root, a folder of XML
    files) and the list lines naming an id without one."""
    if annotations.is_file():  # VOC2007/ImageSets/Main/<split>.txt -> VOC2007/Annotations/<id>.xml
        folder = annotations.parent.parent.parent / "Annotations"
        files, problems = [], []
        for number, line in enumerate(annotations.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                path = folder / f"{line.split()[0]}.xml"
                if path.is_file():
                    files.append(path)
                else:
                    problems.append(("listed_file_missing", f"{annotations}:{number}", f"no {path}"))
        return files, problems
    folder = annotations / "Annotations" if (annotations / "Annotations").is_dir() else annotations
    return sorted(folder.glob("*.xml")), []


def read_voc(images_dir: str | Path, annotations: str | Path, image_names: list[str],
             classes: list[str] | None = None) -> tuple[dict, list[tuple[str, str, str]]]:
    """-> (COCO dict, problems as (check, "file:line", detail)). `image_names`: the image files
    of `images_dir`; `classes`: the names in label order (None: the names found, sorted).
    Objects with a problem are left out of the dict."""
    images_dir, annotations = Path(images_dir), Path(annotations)
    files, problems = xml_files(annotations)
    documents = []
    for path in files:
        try:
            documents.append((path, parse_xml(path)))
        except expat.ExpatError as error:
            problems.append(("xml_malformed", f"{path}:{error.lineno}", expat.ErrorString(error.code)))
    if not files and not problems:
        raise MissingFileError(f"{annotations}: no .xml files (a Pascal VOC dataset has one per image)")
    found = {obj.value("name") for _, root in documents for obj in root.children if obj.tag == "object"}
    names = list(classes) if classes is not None else sorted(found - {None, ""})
    category_ids = {name: i + 1 for i, name in enumerate(names)}
    by_stem = {}
    for name in image_names:
        by_stem.setdefault(Path(name).stem, name)
    images, anns = [], []
    for path, root in documents:
        file_name = by_stem.get(path.stem) or root.value("filename") or f"{path.stem}.jpg"
        width, height = _size(root, images_dir / file_name)
        images.append({"id": len(images) + 1, "file_name": file_name, "width": width,
                       "height": height, "source": str(path)})
        for obj in (c for c in root.children if c.tag == "object"):
            where, name, corners = f"{path}:{obj.line}", obj.value("name"), _corners(obj)
            if not name or corners is None:
                problems.append(("bad_voc_object", where, "no <name>" if not name else
                                 "<bndbox> needs numeric xmin, ymin, xmax, ymax"))
            elif name not in category_ids:
                problems.append(("unknown_class", where, f"{name!r} is not in data.classes"))
            else:
                xmin, ymin, xmax, ymax = corners
                w, h = xmax - xmin + 1, ymax - ymin + 1
                anns.append({"id": len(anns) + 1, "image_id": images[-1]["id"],
                             "category_id": category_ids[name], "bbox": [xmin - 1, ymin - 1, w, h],
                             "area": max(w, 0) * max(h, 0), "iscrowd": int(_difficult(obj)),
                             "source": where})
    categories = [{"id": i, "name": name} for name, i in category_ids.items()]
    return ({"info": {"description": f"Pascal VOC annotations {annotations}"}, "images": images,
             "annotations": anns, "categories": categories}, problems)


def _number(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _corners(obj: Node) -> list[float] | None:
    box = obj.find("bndbox")
    values = [_number(box.value(k)) for k in COORDINATES] if box is not None else [None]
    return None if None in values else values


def _difficult(obj: Node) -> bool:
    return bool(_number(obj.value("difficult")) or 0)


def _size(root: Node, image: Path) -> tuple[int, int]:
    """(width, height): the XML's <size> when both are positive, else the image file's, else 0."""
    size = root.find("size")
    width, height = (_number(size.value("width")), _number(size.value("height"))) if size is not None \
        else (0, 0)
    if width and height and width > 0 and height > 0:
        return int(width), int(height)
    try:
        height, width = image_size(image)
        return width, height
    except OSError:  # missing or not an image: the checker names it
        return 0, 0
