"""emolabel's labels in an XMP sidecar, merged into what other tools wrote there.

`merge_sidecar(existing, labels)` returns the new sidecar's bytes; `write_sidecar` writes them
atomically (a temporary file in the same folder, then `os.replace`), keeping the old file's mode.

What a sidecar holds from us:
- keywords, in the three lists photo managers read: `dc:subject` (the leaf word, "happy"),
  `lr:hierarchicalSubject` ("emolabel|happy": Lightroom, darktable, digiKam) and
  `digiKam:TagsList` ("emolabel/happy"); which keywords: `keywords_for`;
- our own fields in the `emolabel` namespace (`EMOLABEL_NAMESPACE`): label, confidence, outcome,
  modelVersion, runnerUp, runnerUpConfidence, humanLabel, faceCount (face models), and keywords:
  the keyword strings this write added, so that the next write can take exactly those away;
- for a face model, one MWG region per face (`mwg-rs:Regions`), marked as ours by the emolabel
  fields inside it.

Merging never clobbers: every property, keyword, region, namespace prefix and comment that is not
ours is kept; ours are removed and written again. A rewrite with the same labels gives the same
bytes (there is no timestamp), so `write_sidecar` can answer "unchanged". A sidecar that is not
XML, declares a document type (entity expansion), or whose root is not `x:xmpmeta` or `rdf:RDF`
raises `SidecarError` and is never overwritten.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from core.errors import EmolabelError
from emolabel.sidecars import rdfxml

META_NAMESPACE = "adobe:ns:meta/"
RDF_NAMESPACE = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC_NAMESPACE = "http://purl.org/dc/elements/1.1/"
LIGHTROOM_NAMESPACE = "http://ns.adobe.com/lightroom/1.0/"
DIGIKAM_NAMESPACE = "http://www.digikam.org/ns/1.0/"
EMOLABEL_NAMESPACE = "http://ns.emolabel.org/1.0/"
REGIONS_NAMESPACE = "http://www.metadataworkinggroup.com/schemas/regions/"
AREA_NAMESPACE = "http://ns.adobe.com/xmp/sType/Area#"
DIMENSIONS_NAMESPACE = "http://ns.adobe.com/xap/1.0/sType/Dimensions#"
# The prefixes we write a namespace with when the sidecar does not bind it already.
STANDARD_PREFIXES = {
    META_NAMESPACE: "x",
    RDF_NAMESPACE: "rdf",
    DC_NAMESPACE: "dc",
    LIGHTROOM_NAMESPACE: "lr",
    DIGIKAM_NAMESPACE: "digiKam",
    EMOLABEL_NAMESPACE: "emolabel",
    REGIONS_NAMESPACE: "mwg-rs",
    AREA_NAMESPACE: "stArea",
    DIMENSIONS_NAMESPACE: "stDim",
}

PACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
PACKET_END = '<?xpacket end="w"?>'
NAMINGS = ("append", "replace")
OUTCOMES = ("labeled", "uncertain", "no_face")
FACE_OUTCOMES = ("labeled", "uncertain")
NO_FACE_KEYWORD = "no face"
UNCERTAIN_KEYWORD = "uncertain"
DEFAULT_ROOT = "emolabel"
# XML 1.0 cannot carry these characters at all, not even as references.
NOT_XML_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _name(namespace: str, local: str) -> str:
    return f"{{{namespace}}}{local}"


XMPMETA = _name(META_NAMESPACE, "xmpmeta")
XAPMETA = _name(META_NAMESPACE, "xapmeta")  # the name before XMP 2004; still read
RDF = _name(RDF_NAMESPACE, "RDF")
DESCRIPTION = _name(RDF_NAMESPACE, "Description")
ABOUT = _name(RDF_NAMESPACE, "about")
PARSE_TYPE = _name(RDF_NAMESPACE, "parseType")
BAG = _name(RDF_NAMESPACE, "Bag")
SEQ = _name(RDF_NAMESPACE, "Seq")
ALT = _name(RDF_NAMESPACE, "Alt")
LI = _name(RDF_NAMESPACE, "li")
REGIONS = _name(REGIONS_NAMESPACE, "Regions")
REGION_LIST = _name(REGIONS_NAMESPACE, "RegionList")
APPLIED_TO_DIMENSIONS = _name(REGIONS_NAMESPACE, "AppliedToDimensions")
OUR_KEYWORDS = _name(EMOLABEL_NAMESPACE, "keywords")
XML_LANG = _name(rdfxml.XML_NAMESPACE, "lang")


class SidecarError(EmolabelError, ValueError):
    """An existing sidecar that cannot be read as XMP; it is left as it is."""


@dataclass(frozen=True)
class FaceRegion:
    """One face: its box normalized to 0..1 (top-left corner and size) and its label."""

    x: float
    y: float
    width: float
    height: float
    label: str | None
    confidence: float | None
    outcome: str  # "labeled" | "uncertain"

    def __post_init__(self) -> None:
        if self.outcome not in FACE_OUTCOMES:
            raise ValueError(f"a face's outcome is one of {FACE_OUTCOMES}, not {self.outcome!r}")
        if self.outcome == "labeled" and self.label is None:
            raise ValueError("a labeled face needs a label")
        if not all(math.isfinite(value) for value in (self.x, self.y, self.width, self.height)):
            raise ValueError(f"a face box needs finite numbers, not {self}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"a face box needs a positive width and height, not {self}")
        if self.x >= 1 or self.y >= 1 or self.x + self.width <= 0 or self.y + self.height <= 0:
            raise ValueError(f"a face box must overlap the image (0..1 normalized), not {self}")
        _check_confidence(self.confidence)
        _check_text(self.label)


@dataclass(frozen=True)
class SidecarLabels:
    """What one photo's sidecar says: the model's label, a person's correction, the faces."""

    outcome: str  # "labeled" | "uncertain" | "no_face"
    label: str | None  # the photo's label (a face model: the largest face's)
    confidence: float | None
    model_version: str
    runner_up: str | None = None
    runner_up_confidence: float | None = None
    human_label: str | None = None  # a person's correction; wins over the model's label
    faces: tuple[FaceRegion, ...] | None = None  # None: a whole-image model (no regions)
    image_width: int | None = None  # pixels, for mwg-rs:AppliedToDimensions
    image_height: int | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"a photo's outcome is one of {OUTCOMES}, not {self.outcome!r}")
        if self.outcome == "labeled" and self.label is None:
            raise ValueError("a labeled photo needs a label")
        if not self.model_version:
            raise ValueError("a sidecar needs the model version that made its labels")
        for size in (self.image_width, self.image_height):
            if size is not None and size <= 0:
                raise ValueError(f"image dimensions are positive pixels, not {size}")
        _check_confidence(self.confidence)
        _check_confidence(self.runner_up_confidence)
        for text in (self.label, self.model_version, self.runner_up, self.human_label):
            _check_text(text)


def _check_confidence(confidence: float | None) -> None:
    if confidence is not None and not 0 <= confidence <= 1:  # NaN fails this too
        raise ValueError(f"a confidence is between 0 and 1, not {confidence}")


def _check_text(text: str | None) -> None:
    if text is not None and NOT_XML_CHARACTERS.search(text):
        raise ValueError(f"{text!r} has characters that XML cannot hold")


def sidecar_path(image: Path, naming: str) -> Path:
    """The sidecar of `image`: "append" gives photo.jpg.xmp (digiKam, darktable), "replace"
    gives photo.xmp (Lightroom)."""
    if naming == "append":
        return image.with_name(f"{image.name}.xmp")
    if naming == "replace":
        return image.with_suffix(".xmp")
    raise ValueError(f"sidecar naming is one of {NAMINGS}, not {naming!r}")


def keywords_for(labels: SidecarLabels, root: str) -> list[str]:
    """The photo's keywords under `root`, '|'-separated ("emolabel|happy"): a person's label
    alone when there is one; else each distinct confident label, and "uncertain" when the photo
    or any face is uncertain; "no face" for a face model that found none."""
    _check_keyword(root, what="keyword root", hierarchical=True)
    if labels.human_label is not None:
        words = [labels.human_label]
    elif labels.outcome == "no_face":
        words = [NO_FACE_KEYWORD]
    else:
        faces = labels.faces or ()
        confident = [labels.label] if labels.outcome == "labeled" else []
        confident += [face.label for face in faces if face.outcome == "labeled"]
        words = list(dict.fromkeys(word for word in confident if word is not None))
        if labels.outcome == "uncertain" or any(face.outcome == "uncertain" for face in faces):
            words.append(UNCERTAIN_KEYWORD)
    for word in words:
        _check_keyword(word, what="label", hierarchical=False)
    return [f"{root}|{word}" for word in words]


def _check_keyword(keyword: str, *, what: str, hierarchical: bool) -> None:
    # "|" (Lightroom) and "/" (digiKam) would make a label a deeper level of the hierarchy.
    parts = keyword.split("|") if hierarchical else [keyword]
    for part in parts:
        if not part.strip() or "/" in part or "|" in part:
            raise ValueError(
                f"{what} {keyword!r} cannot be a keyword: empty parts, '/' and '|' are not allowed"
            )


@dataclass(frozen=True)
class _KeywordList:
    tag: str
    array: str
    separator: str | None  # None: leaf words only

    def form(self, keyword: str) -> str:
        """The list's spelling of a '|'-separated keyword."""
        if self.separator is None:
            return keyword.rsplit("|", 1)[-1]
        return keyword.replace("|", self.separator)

    def is_ours(self, text: str, previous: set[str], root: str) -> bool:
        if self.separator is None:
            return text in previous
        # A flat word in `previous` went into dc:subject; the same word here is someone else's.
        under_root = self.form(root) + self.separator
        return (text in previous and self.separator in text) or text.startswith(under_root)


KEYWORD_LISTS = (
    _KeywordList(_name(DC_NAMESPACE, "subject"), BAG, None),
    _KeywordList(_name(LIGHTROOM_NAMESPACE, "hierarchicalSubject"), BAG, "|"),
    _KeywordList(_name(DIGIKAM_NAMESPACE, "TagsList"), SEQ, "/"),
)


def merge_sidecar(
    existing: bytes | None, labels: SidecarLabels, *, root: str = DEFAULT_ROOT
) -> bytes:
    """The sidecar `existing` (None: no sidecar yet) with our old labels replaced by `labels`."""
    keywords = keywords_for(labels, root)
    meta, bindings = _read(existing) if existing is not None else (_empty_packet(), [])
    rdf = meta.find(RDF)
    if rdf is None:  # an empty x:xmpmeta
        rdf = ET.SubElement(meta, RDF)
    descriptions = rdf.findall(DESCRIPTION)
    about = descriptions[0].get(ABOUT, "") if descriptions else ""
    previous = {item.text or "" for item in rdf.iterfind(f"{DESCRIPTION}/{OUR_KEYWORDS}//{LI}")}
    for description in descriptions:
        if _remove_ours(description, previous, root) and _is_empty(description):
            rdf.remove(description)
    descriptions = rdf.findall(DESCRIPTION)

    # XMP wants one rdf:about for all descriptions: ours takes the sidecar's.
    ours = ET.Element(DESCRIPTION, {ABOUT: about})
    _add_fields(ours, labels)
    added = _add_keywords(descriptions, ours, keywords)
    if added:
        _add_array(ours, OUR_KEYWORDS, BAG, added)
    if labels.faces:
        _add_regions(descriptions, ours, labels)
    rdf.append(ours)

    prefixes = rdfxml.assign_prefixes([*bindings, *_swap(STANDARD_PREFIXES)], meta)
    top_level = set(rdf)
    body = rdfxml.serialize(meta, prefixes, declares_subtree=lambda element: element in top_level)
    return f"{PACKET_BEGIN}\n{body}\n{PACKET_END}".encode()


def _swap(prefixes: dict[str, str]) -> Iterable[tuple[str, str]]:
    return ((prefix, uri) for uri, prefix in prefixes.items())


def _read(existing: bytes) -> tuple[ET.Element, list[tuple[str, str]]]:
    try:
        root, bindings = rdfxml.parse(existing)
    except rdfxml.XmlRefused as error:
        raise SidecarError(f"not a readable XMP sidecar: {error}") from error
    if root.tag in (XMPMETA, XAPMETA):
        return root, bindings
    if root.tag == RDF:  # some tools write the RDF alone; we wrap it in the standard packet
        meta = ET.Element(XMPMETA)
        meta.append(root)
        return meta, bindings
    raise SidecarError(
        f"not an XMP sidecar: its root element is {root.tag!r}, not x:xmpmeta or rdf:RDF"
    )


def _empty_packet() -> ET.Element:
    meta = ET.Element(XMPMETA)
    ET.SubElement(meta, RDF)
    return meta


def _is_ours(name: str) -> bool:
    return name.startswith(f"{{{EMOLABEL_NAMESPACE}}}")


def _field_names(fields: ET.Element) -> set[str]:
    """The struct's (or description's) field names, whether written as attributes or elements."""
    attributes = {
        key
        for key in fields.attrib
        if not key.startswith(f"{{{RDF_NAMESPACE}}}") and key != XML_LANG
    }
    return attributes | {child.tag for child in fields if isinstance(child.tag, str)}


def _struct_fields(property_element: ET.Element) -> ET.Element:
    """The element whose attributes and children are a struct's fields, in any of RDF's forms:
    rdf:parseType="Resource", a nested rdf:Description, or the attribute shorthand."""
    if property_element.get(PARSE_TYPE) == "Resource":
        return property_element
    inner = property_element.find(DESCRIPTION)
    return inner if inner is not None else property_element


def _array(property_element: ET.Element) -> ET.Element | None:
    for child in property_element:
        if child.tag in (BAG, SEQ, ALT):
            return child
    return None


def _is_empty(description: ET.Element) -> bool:
    return len(description) == 0 and not _field_names(description)


def _remove_ours(description: ET.Element, previous: set[str], root: str) -> bool:
    """Take our fields, keywords and regions out of a top-level description; True if any was."""
    fields = _remove_fields(description)
    keywords = _remove_keywords(description, previous, root)
    regions = _remove_regions(description)
    return fields or keywords or regions


def _remove_fields(description: ET.Element) -> bool:
    attributes = [key for key in description.attrib if _is_ours(key)]
    for key in attributes:
        del description.attrib[key]
    children = [
        child for child in description if isinstance(child.tag, str) and _is_ours(child.tag)
    ]
    for child in children:
        description.remove(child)
    return bool(attributes or children)


def _remove_keywords(description: ET.Element, previous: set[str], root: str) -> bool:
    removed_any = False
    for keyword_list in KEYWORD_LISTS:
        for property_element in description.findall(keyword_list.tag):
            array = _array(property_element)
            if array is None:
                continue
            doomed = [
                item
                for item in array.findall(LI)
                if keyword_list.is_ours(item.text or "", previous, root)
            ]
            for item in doomed:
                array.remove(item)
            # Only a list we emptied goes; someone else's empty list stays as it was.
            if doomed and array.find(LI) is None:
                description.remove(property_element)
            removed_any = removed_any or bool(doomed)
    return removed_any


def _remove_regions(description: ET.Element) -> bool:
    removed_any = False
    for regions in description.findall(REGIONS):
        fields = _struct_fields(regions)
        removed_here = False
        for region_list in fields.findall(REGION_LIST):
            array = _array(region_list)
            if array is None:
                continue
            doomed = [
                region
                for region in array.findall(LI)
                if any(_is_ours(name) for name in _field_names(_struct_fields(region)))
            ]
            for region in doomed:
                array.remove(region)
            if doomed and array.find(LI) is None:
                fields.remove(region_list)
            removed_here = removed_here or bool(doomed)
        # Dimensions with no region left describe nothing: the struct goes with our regions.
        if removed_here and _field_names(fields) <= {APPLIED_TO_DIMENSIONS}:
            description.remove(regions)
        removed_any = removed_any or removed_here
    return removed_any


def _decimal(value: float | None, places: int = 6) -> str | None:
    return None if value is None else f"{value:.{places}f}"


def _add_fields(ours: ET.Element, labels: SidecarLabels) -> None:
    face_count = None if labels.faces is None else str(len(labels.faces))
    values = {
        "label": labels.label,
        "confidence": _decimal(labels.confidence),
        "outcome": labels.outcome,
        "modelVersion": labels.model_version,
        "runnerUp": labels.runner_up,
        "runnerUpConfidence": _decimal(labels.runner_up_confidence),
        "humanLabel": labels.human_label,
        "faceCount": face_count,
    }
    _add_values(ours, values)


def _add_values(parent: ET.Element, values: dict[str, str | None]) -> None:
    for local, value in values.items():
        if value is not None:
            ET.SubElement(parent, _name(EMOLABEL_NAMESPACE, local)).text = value


def _add_array(parent: ET.Element, tag: str, array_tag: str, items: Iterable[str]) -> None:
    array = ET.SubElement(ET.SubElement(parent, tag), array_tag)
    for text in items:
        ET.SubElement(array, LI).text = text


def _add_keywords(
    descriptions: list[ET.Element], ours: ET.Element, keywords: list[str]
) -> list[str]:
    """Add the keywords to the three lists, into the sidecar's own lists where it has them;
    return the strings added (a keyword a list already holds is not added twice)."""
    added: dict[str, None] = {}
    for keyword_list in KEYWORD_LISTS:
        array = _keyword_array(descriptions, ours, keyword_list)
        present = {item.text or "" for item in array.findall(LI)}
        for keyword in keywords:
            text = keyword_list.form(keyword)
            if text not in present:
                ET.SubElement(array, LI).text = text
                present.add(text)
                added.setdefault(text)
    return list(added)


def _keyword_array(
    descriptions: list[ET.Element], ours: ET.Element, keyword_list: _KeywordList
) -> ET.Element:
    for description in descriptions:
        property_element = description.find(keyword_list.tag)
        if property_element is not None:
            array = _array(property_element)
            if array is None:  # one keyword as plain text, which some writers do: make it a list
                text, property_element.text = property_element.text, None
                array = ET.SubElement(property_element, keyword_list.array)
                if text and text.strip(rdfxml.XML_WHITESPACE):
                    ET.SubElement(array, LI).text = text
            return array
        text = description.get(keyword_list.tag)
        if text is not None:  # the same, as an attribute
            del description.attrib[keyword_list.tag]
            _add_array(description, keyword_list.tag, keyword_list.array, [text])
            return _keyword_array([description], ours, keyword_list)
    return ET.SubElement(ET.SubElement(ours, keyword_list.tag), keyword_list.array)


def _add_regions(descriptions: list[ET.Element], ours: ET.Element, labels: SidecarLabels) -> None:
    """Our faces join the sidecar's mwg-rs:Regions (another tool's regions and dimensions stay)."""
    regions = next(
        (found for found in (d.find(REGIONS) for d in descriptions) if found is not None), None
    )
    if regions is None:
        regions = ET.SubElement(ours, REGIONS, {PARSE_TYPE: "Resource"})
    fields = _struct_fields(regions)
    if len(fields) == 0 and not fields.attrib:  # an empty <mwg-rs:Regions/>
        fields.set(PARSE_TYPE, "Resource")
    if (
        fields.find(APPLIED_TO_DIMENSIONS) is None
        and labels.image_width is not None
        and labels.image_height is not None
    ):
        dimensions = ET.SubElement(fields, APPLIED_TO_DIMENSIONS, {PARSE_TYPE: "Resource"})
        for local, value in (
            ("w", str(labels.image_width)),
            ("h", str(labels.image_height)),
            ("unit", "pixel"),
        ):
            ET.SubElement(dimensions, _name(DIMENSIONS_NAMESPACE, local)).text = value
    region_list = fields.find(REGION_LIST)
    if region_list is None:
        region_list = ET.SubElement(fields, REGION_LIST)
    array = _array(region_list)
    if array is None:
        array = ET.SubElement(region_list, BAG)
    for face in labels.faces or ():
        array.append(_region(face, labels.model_version))


def _region(face: FaceRegion, model_version: str) -> ET.Element:
    # MWG areas are within the image; a detector's box may reach past an edge.
    left, right = max(face.x, 0.0), min(face.x + face.width, 1.0)
    top, bottom = max(face.y, 0.0), min(face.y + face.height, 1.0)
    region = ET.Element(LI, {PARSE_TYPE: "Resource"})
    area = ET.SubElement(region, _name(REGIONS_NAMESPACE, "Area"), {PARSE_TYPE: "Resource"})
    # MWG's x and y are the centre of the area, not its corner.
    for local, value in (
        ("x", _decimal((left + right) / 2)),
        ("y", _decimal((top + bottom) / 2)),
        ("w", _decimal(right - left)),
        ("h", _decimal(bottom - top)),
        ("unit", "normalized"),
    ):
        ET.SubElement(area, _name(AREA_NAMESPACE, local)).text = value
    ET.SubElement(region, _name(REGIONS_NAMESPACE, "Type")).text = "Face"
    ET.SubElement(region, _name(REGIONS_NAMESPACE, "Description")).text = _describe(face)
    # No mwg-rs:Name: digiKam and Lightroom take a face region's Name for the person's name, and
    # would file an emotion as a person.
    _add_values(
        region,
        {
            "label": face.label,
            "confidence": _decimal(face.confidence),
            "outcome": face.outcome,
            "modelVersion": model_version,
        },
    )
    return region


def _describe(face: FaceRegion) -> str:
    words = [word for word in (face.label, _decimal(face.confidence, 2)) if word is not None]
    if face.outcome == "uncertain":
        return " ".join([f"{UNCERTAIN_KEYWORD}:", *words]) if words else UNCERTAIN_KEYWORD
    return " ".join(words)


def write_sidecar(path: Path, labels: SidecarLabels, *, root: str, dry_run: bool = False) -> str:
    """Merge `labels` into the sidecar at `path`; "created", "updated" or "unchanged".

    With `dry_run`, the answer is the same and nothing is written."""
    # A symlinked sidecar is written through, not replaced by a plain file.
    target = path.resolve() if path.is_symlink() else path
    try:
        with target.open("rb") as file:
            existing: bytes | None = file.read()
            mode: int | None = os.fstat(file.fileno()).st_mode & 0o7777
    except FileNotFoundError:
        existing, mode = None, None
    try:
        content = merge_sidecar(existing, labels, root=root)
    except SidecarError as error:
        raise SidecarError(f"{path}: {error}; the file is left as it is") from error
    if content == existing:
        return "unchanged"
    if not dry_run:
        _replace_atomically(target, content, mode)
    return "created" if existing is None else "updated"


def _replace_atomically(path: Path, content: bytes, mode: int | None) -> None:
    # In the same folder, so that os.replace is a rename: a reader sees the old file or the new
    # one, never half of one. A new file gets 0o666 less the umask, as any new file would.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            if mode is not None:
                os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
