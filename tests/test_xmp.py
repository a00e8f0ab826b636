"""XMP sidecar write-back (emolabel/sidecars/xmp.py), read back by the real exiftool.

Fresh sidecars, face regions, a sidecar exiftool wrote itself, and a Lightroom-style one with
attribute-form properties are merged and read back with `exiftool -j -struct -G1 -a`; what other
tools wrote must survive and ours must reflect the last write only. Skipped where exiftool is
missing and this is not CI; in CI it must run (scripts/setup installs Debian's
libimage-exiftool-perl).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from emolabel.sidecars.xmp import (
    EMOLABEL_NAMESPACE,
    FaceRegion,
    SidecarError,
    SidecarLabels,
    keywords_for,
    merge_sidecar,
    sidecar_path,
    write_sidecar,
)

EXIFTOOL = shutil.which("exiftool")
needs_exiftool = pytest.mark.skipif(
    EXIFTOOL is None and os.environ.get("CI") != "true",
    reason="exiftool is not installed (Debian: libimage-exiftool-perl, which scripts/setup "
    "installs); CI always runs these tests",
)

HAPPY = SidecarLabels(
    outcome="labeled",
    label="happy",
    confidence=0.93,
    model_version="emo-v1",
    runner_up="sad",
    runner_up_confidence=0.05,
)
TWO_FACES = SidecarLabels(
    outcome="labeled",
    label="happy",
    confidence=0.93,
    model_version="faces-v1",
    faces=(
        FaceRegion(x=0.1, y=0.2, width=0.2, height=0.3, label="happy", confidence=0.93,
                   outcome="labeled"),
        FaceRegion(x=0.6, y=0.1, width=0.1, height=0.1, label="sad", confidence=0.41,
                   outcome="uncertain"),
    ),
    image_width=640,
    image_height=480,
)  # fmt: skip

# What Lightroom Classic writes: simple properties as attributes of one rdf:Description. The
# emolabel attributes are a sidecar of ours that Lightroom read and wrote back in its own form.
LIGHTROOM_SIDECAR = """<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="Adobe XMP Core 7.0-c000">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:tiff="http://ns.adobe.com/tiff/1.0/"
    xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"
    xmlns:stEvt="http://ns.adobe.com/xap/1.0/sType/ResourceEvent#"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:crs="http://ns.adobe.com/camera-raw-settings/1.0/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
    xmlns:emolabel="http://ns.emolabel.org/1.0/"
   xmp:ModifyDate="2024-05-01T10:00:00+02:00"
   xmp:Rating="3"
   xmp:Label="Red"
   tiff:Make="Canon"
   crs:Version="15.3"
   crs:Exposure2012="+0.35"
   crs:HasCrop="False"
   emolabel:label="sad"
   emolabel:confidence="0.800000"
   emolabel:outcome="labeled"
   emolabel:modelVersion="emo-v0">
   <!-- keywords reviewed by hand -->
   <xmpMM:History>
    <rdf:Seq>
     <rdf:li
      stEvt:action="saved"
      stEvt:when="2024-05-01T10:00:00+02:00"
      stEvt:softwareAgent="Adobe Photoshop Lightroom Classic 13.3"/>
    </rdf:Seq>
   </xmpMM:History>
   <dc:title>
    <rdf:Alt>
     <rdf:li xml:lang="x-default">Trevi</rdf:li>
    </rdf:Alt>
   </dc:title>
   <dc:subject>
    <rdf:Bag>
     <rdf:li>Rome</rdf:li>
     <rdf:li>happy</rdf:li>
     <rdf:li>sad</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <lr:hierarchicalSubject>
    <rdf:Bag>
     <rdf:li>Places|Italy|Rome</rdf:li>
     <rdf:li>emolabel|sad</rdf:li>
    </rdf:Bag>
   </lr:hierarchicalSubject>
   <emolabel:keywords>
    <rdf:Bag>
     <rdf:li>sad</rdf:li>
     <rdf:li>emolabel|sad</rdf:li>
    </rdf:Bag>
   </emolabel:keywords>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE x:xmpmeta [
 <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">
 <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
 <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
]>
<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" dc:format="&d;"/>
</rdf:RDF></x:xmpmeta>
"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE x:xmpmeta SYSTEM "file:///etc/passwd">
<x:xmpmeta xmlns:x="adobe:ns:meta/"/>
"""


def exiftool_json(path: Path) -> dict[str, Any]:
    """Everything exiftool reads from `path`, grouped by family-1 group ("XMP-dc:Subject")."""
    if EXIFTOOL is None:
        pytest.fail("exiftool is missing; CI must have it (scripts/setup installs it)")
    completed = subprocess.run(
        [EXIFTOOL, "-j", "-struct", "-G1", "-a", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    tags: dict[str, Any] = json.loads(completed.stdout)[0]
    assert "ExifTool:Warning" not in tags, tags["ExifTool:Warning"]
    assert "ExifTool:Error" not in tags, tags["ExifTool:Error"]
    return tags


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def our_regions(tags: dict[str, Any]) -> list[dict[str, Any]]:
    regions = tags["XMP-mwg-rs:RegionInfo"]["RegionList"]
    return [region for region in regions if "ModelVersion" in region]


@needs_exiftool
def test_a_fresh_sidecar_for_a_whole_image_label(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg.xmp"

    assert write_sidecar(path, HAPPY, root="emolabel") == "created"

    content = path.read_bytes()
    assert content.startswith(
        b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>\n<x:xmpmeta'
    )
    assert content.endswith(b'<?xpacket end="w"?>')
    tags = exiftool_json(path)
    assert as_list(tags["XMP-dc:Subject"]) == ["happy"]
    assert as_list(tags["XMP-lr:HierarchicalSubject"]) == ["emolabel|happy"]
    assert as_list(tags["XMP-digiKam:TagsList"]) == ["emolabel/happy"]
    assert tags["XMP-emolabel:Label"] == "happy"
    assert tags["XMP-emolabel:Confidence"] == pytest.approx(0.93)
    assert tags["XMP-emolabel:Outcome"] == "labeled"
    assert tags["XMP-emolabel:ModelVersion"] == "emo-v1"
    assert tags["XMP-emolabel:RunnerUp"] == "sad"
    assert tags["XMP-emolabel:RunnerUpConfidence"] == pytest.approx(0.05)
    assert as_list(tags["XMP-emolabel:Keywords"]) == ["happy", "emolabel|happy", "emolabel/happy"]
    for absent in ("XMP-emolabel:HumanLabel", "XMP-emolabel:FaceCount", "XMP-mwg-rs:RegionInfo"):
        assert absent not in tags


@needs_exiftool
def test_a_face_model_writes_one_mwg_region_per_face(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg.xmp"

    write_sidecar(path, TWO_FACES, root="emolabel")

    tags = exiftool_json(path)
    info = tags["XMP-mwg-rs:RegionInfo"]
    assert info["AppliedToDimensions"] == {"W": 640, "H": 480, "Unit": "pixel"}
    regions = info["RegionList"]
    assert [region["Type"] for region in regions] == ["Face", "Face"]
    # MWG's X and Y are the centre of the box.
    centres = [(region["Area"]["X"], region["Area"]["Y"]) for region in regions]
    assert centres == [pytest.approx((0.2, 0.35)), pytest.approx((0.65, 0.15))]
    sizes = [(region["Area"]["W"], region["Area"]["H"]) for region in regions]
    assert sizes == [pytest.approx((0.2, 0.3)), pytest.approx((0.1, 0.1))]
    assert {region["Area"]["Unit"] for region in regions} == {"normalized"}
    assert [region["Description"] for region in regions] == ["happy 0.93", "uncertain: sad 0.41"]
    assert [region["Label"] for region in regions] == ["happy", "sad"]
    assert [region["Outcome"] for region in regions] == ["labeled", "uncertain"]
    assert [region["Confidence"] for region in regions] == [
        pytest.approx(0.93),
        pytest.approx(0.41),
    ]
    assert {region["ModelVersion"] for region in regions} == {"faces-v1"}
    # An emotion is not a person: no region is named.
    assert all("Name" not in region for region in regions)
    assert tags["XMP-emolabel:FaceCount"] == 2
    assert as_list(tags["XMP-lr:HierarchicalSubject"]) == ["emolabel|happy", "emolabel|uncertain"]
    assert as_list(tags["XMP-dc:Subject"]) == ["happy", "uncertain"]


@needs_exiftool
def test_a_sidecar_exiftool_wrote_keeps_its_tags_through_two_writes(tmp_path: Path) -> None:
    assert EXIFTOOL is not None
    path = tmp_path / "photo.jpg.xmp"
    subprocess.run(
        [
            EXIFTOOL, "-q", "-o", str(path),
            "-XMP-dc:Subject=Holiday",
            "-XMP-lr:HierarchicalSubject=Places|Rome",
            "-XMP-xmp:Rating=4",
            "-XMP-mwg-rs:RegionInfo={AppliedToDimensions={W=100,H=80,Unit=pixel},"
            "RegionList=[{Area={X=0.5,Y=0.5,W=0.2,H=0.2,Unit=normalized},Name=Anna,Type=Face}]}",
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    first = SidecarLabels(
        outcome="labeled",
        label="happy",
        confidence=0.9,
        model_version="faces-v1",
        faces=(FaceRegion(0.1, 0.1, 0.2, 0.2, "happy", 0.9, "labeled"),),
        image_width=100,
        image_height=80,
    )
    second = SidecarLabels(
        outcome="labeled",
        label="sad",
        confidence=0.7,
        model_version="faces-v2",
        faces=(FaceRegion(0.6, 0.5, 0.3, 0.3, "sad", 0.7, "labeled"),),
        image_width=100,
        image_height=80,
    )

    assert write_sidecar(path, first, root="emolabel") == "updated"
    assert write_sidecar(path, second, root="emolabel") == "updated"

    tags = exiftool_json(path)
    assert as_list(tags["XMP-dc:Subject"]) == ["Holiday", "sad"]
    assert as_list(tags["XMP-lr:HierarchicalSubject"]) == ["Places|Rome", "emolabel|sad"]
    assert as_list(tags["XMP-digiKam:TagsList"]) == ["emolabel/sad"]
    assert tags["XMP-xmp:Rating"] == 4
    assert tags["XMP-emolabel:ModelVersion"] == "faces-v2"
    assert tags["XMP-emolabel:Label"] == "sad"
    info = tags["XMP-mwg-rs:RegionInfo"]
    assert info["AppliedToDimensions"] == {"W": 100, "H": 80, "Unit": "pixel"}
    anna, ours = info["RegionList"]
    assert anna == {
        "Area": {"H": 0.2, "Unit": "normalized", "W": 0.2, "X": 0.5, "Y": 0.5},
        "Name": "Anna",
        "Type": "Face",
    }
    assert ours["ModelVersion"] == "faces-v2"
    assert (ours["Area"]["X"], ours["Area"]["Y"]) == pytest.approx((0.75, 0.65))
    assert write_sidecar(path, second, root="emolabel") == "unchanged"

    # A whole-image model next: our regions go, Anna's stay.
    write_sidecar(path, HAPPY, root="emolabel")
    tags = exiftool_json(path)
    assert [region.get("Name") for region in tags["XMP-mwg-rs:RegionInfo"]["RegionList"]] == [
        "Anna"
    ]
    assert "XMP-emolabel:FaceCount" not in tags
    assert as_list(tags["XMP-dc:Subject"]) == ["Holiday", "happy"]


@needs_exiftool
def test_a_lightroom_sidecar_with_attribute_properties_survives(tmp_path: Path) -> None:
    path = tmp_path / "photo.xmp"
    path.write_text(LIGHTROOM_SIDECAR, encoding="utf-8")
    labels = SidecarLabels(outcome="labeled", label="happy", confidence=0.9, model_version="emo-v2")

    assert write_sidecar(path, labels, root="emolabel") == "updated"

    content = path.read_bytes()
    # Unknown namespaces keep their prefixes, attributes stay attributes, comments stay.
    assert b'crs:Exposure2012="+0.35"' in content
    assert b'xmlns:crs="http://ns.adobe.com/camera-raw-settings/1.0/"' in content
    assert b"<!-- keywords reviewed by hand -->" in content
    assert b"ns0:" not in content
    assert b'emolabel:label="sad"' not in content
    tags = exiftool_json(path)
    assert tags["XMP-xmp:Rating"] == 3
    assert tags["XMP-xmp:Label"] == "Red"
    assert tags["XMP-tiff:Make"] == "Canon"
    assert tags["XMP-crs:Version"] == 15.3
    assert tags["XMP-dc:Title"] == "Trevi"
    assert tags["XMP-xmpMM:History"] == [
        {
            "Action": "saved",
            "SoftwareAgent": "Adobe Photoshop Lightroom Classic 13.3",
            "When": "2024:05:01 10:00:00+02:00",
        }
    ]
    # Ours ("sad", "emolabel|sad") are replaced; the person's own "happy" is not doubled.
    assert as_list(tags["XMP-dc:Subject"]) == ["Rome", "happy"]
    assert as_list(tags["XMP-lr:HierarchicalSubject"]) == ["Places|Italy|Rome", "emolabel|happy"]
    assert tags["XMP-emolabel:Label"] == "happy"
    assert tags["XMP-emolabel:ModelVersion"] == "emo-v2"
    # "happy" was the person's: the next write must not take it away.
    assert as_list(tags["XMP-emolabel:Keywords"]) == ["emolabel|happy", "emolabel/happy"]
    assert write_sidecar(path, labels, root="emolabel") == "unchanged"


@needs_exiftool
def test_a_bare_rdf_root_is_wrapped_in_a_standard_packet(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg.xmp"
    path.write_text(
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="2"/>'
        "</rdf:RDF>",
        encoding="utf-8",
    )

    write_sidecar(path, HAPPY, root="emolabel")

    assert b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' in path.read_bytes()
    tags = exiftool_json(path)
    assert tags["XMP-xmp:Rating"] == 2
    assert tags["XMP-emolabel:Label"] == "happy"


def test_a_rewrite_with_the_same_labels_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg.xmp"
    write_sidecar(path, TWO_FACES, root="emolabel")
    before = path.read_bytes()
    stat_before = path.stat()

    assert write_sidecar(path, TWO_FACES, root="emolabel") == "unchanged"

    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == stat_before.st_mtime_ns
    assert merge_sidecar(before, TWO_FACES) == before


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg.xmp"

    assert write_sidecar(path, HAPPY, root="emolabel", dry_run=True) == "created"
    assert not path.exists()

    write_sidecar(path, HAPPY, root="emolabel")
    before = path.read_bytes()
    assert write_sidecar(path, TWO_FACES, root="emolabel", dry_run=True) == "updated"
    assert path.read_bytes() == before
    assert [child.name for child in tmp_path.iterdir()] == ["photo.jpg.xmp"]


def test_an_update_keeps_the_mode_of_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg.xmp"
    write_sidecar(path, HAPPY, root="emolabel")
    path.chmod(0o640)

    assert write_sidecar(path, TWO_FACES, root="emolabel") == "updated"

    assert path.stat().st_mode & 0o777 == 0o640
    assert [child.name for child in tmp_path.iterdir()] == ["photo.jpg.xmp"]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not xml at all",
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF',  # truncated
        b"<html><body>a web page</body></html>",
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><undeclared:prefix/></x:xmpmeta>',
    ],
    ids=["empty", "text", "truncated", "html", "unbound-prefix"],
)
def test_a_sidecar_that_is_not_xmp_is_refused_and_left_alone(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "photo.jpg.xmp"
    path.write_bytes(content)

    with pytest.raises(SidecarError, match=r"photo\.jpg\.xmp: not a"):
        write_sidecar(path, HAPPY, root="emolabel")

    assert path.read_bytes() == content
    assert [child.name for child in tmp_path.iterdir()] == ["photo.jpg.xmp"]


@pytest.mark.parametrize("content", [BILLION_LAUGHS, EXTERNAL_ENTITY], ids=["entities", "system"])
def test_a_document_type_declaration_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "photo.jpg.xmp"
    path.write_bytes(content)

    with pytest.raises(SidecarError, match="DOCTYPE"):
        write_sidecar(path, HAPPY, root="emolabel")

    assert path.read_bytes() == content


def test_sidecar_path_for_both_namings() -> None:
    photo = Path("/photos/2024/IMG_0001.CR3")

    assert sidecar_path(photo, "append") == Path("/photos/2024/IMG_0001.CR3.xmp")
    assert sidecar_path(photo, "replace") == Path("/photos/2024/IMG_0001.xmp")
    with pytest.raises(ValueError, match="naming"):
        sidecar_path(photo, "sibling")


def test_keywords_choose_the_person_then_the_confident_labels() -> None:
    corrected = SidecarLabels("uncertain", "sad", 0.4, "emo-v1", human_label="surprise")
    no_face = SidecarLabels("no_face", None, None, "faces-v1", faces=())

    assert keywords_for(HAPPY, "emolabel") == ["emolabel|happy"]
    assert keywords_for(corrected, "AI|emolabel") == ["AI|emolabel|surprise"]
    assert keywords_for(no_face, "emolabel") == ["emolabel|no face"]
    assert keywords_for(TWO_FACES, "emolabel") == ["emolabel|happy", "emolabel|uncertain"]
    with pytest.raises(ValueError, match=re.escape("'/' and '|'")):
        keywords_for(SidecarLabels("labeled", "happy/sad", 0.9, "emo-v1"), "emolabel")
    with pytest.raises(ValueError, match="root"):
        keywords_for(HAPPY, "emolabel|")


def test_a_hierarchical_root_in_each_keyword_list() -> None:
    first = merge_sidecar(None, HAPPY, root="AI|emolabel")
    content = merge_sidecar(first, HAPPY, root="AI|emolabel")

    assert f'xmlns:emolabel="{EMOLABEL_NAMESPACE}"'.encode() in content
    assert _keyword_lists(content) == {
        "subject": ["happy"],
        "hierarchicalSubject": ["AI|emolabel|happy"],
        "TagsList": ["AI/emolabel/happy"],
        "keywords": ["happy", "AI|emolabel|happy", "AI/emolabel/happy"],
    }
    assert content == first


def test_a_face_box_past_the_edge_is_clipped_to_the_image() -> None:
    labels = SidecarLabels(
        "labeled", "happy", 0.9, "faces-v1",
        faces=(FaceRegion(-0.1, 0.9, 0.3, 0.2, "happy", 0.9, "labeled"),),
    )  # fmt: skip

    root = ET.fromstring(merge_sidecar(None, labels))

    area = {
        element.tag.rsplit("}", 1)[1]: element.text
        for element in root.iter()
        if element.tag.startswith("{http://ns.adobe.com/xmp/sType/Area#}")
    }
    assert area == {"x": "0.100000", "y": "0.950000", "w": "0.200000", "h": "0.100000",
                    "unit": "normalized"}  # fmt: skip


def _keyword_lists(content: bytes) -> dict[str, list[str]]:
    root = ET.fromstring(content)
    lists: dict[str, list[str]] = {}
    for element in root.iter():
        local = element.tag.rsplit("}", 1)[-1]
        if local in {"subject", "hierarchicalSubject", "TagsList", "keywords"}:
            lists[local] = [item.text or "" for item in element.iter() if item.tag.endswith("}li")]
    return lists
