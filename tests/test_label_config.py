"""Label config parsing: output and smart controls, Labels + tool variants, errors, caching."""

import json

import pytest

from samsem_plugin import label_config
from samsem_plugin.cache import ByteLRUCache
from samsem_plugin.label_config import ControlSpec, parse_label_config
from tests.support import FIXTURES

FIXTURE_CONFIG = json.loads((FIXTURES / "setup.json").read_text())["schema"]


def test_fixture_config_controls():
    config = parse_label_config(FIXTURE_CONFIG)
    spec = {c.name: c for c in config.controls}
    assert spec["brush"] == ControlSpec("brush", "BrushLabels", "image", ("Cat", "Dog"), False, "image")
    assert spec["rect"] == ControlSpec("rect", "RectangleLabels", "image", ("Cat", "Dog"), True, "image")
    assert spec["poly"] == ControlSpec("poly", "PolygonLabels", "image", ("Cat", "Dog"), False, "image")
    assert spec["kp"] == ControlSpec("kp", "KeyPointLabels", "image", ("Cat", "Dog"), True, "image")
    assert [c.name for c in config.output_controls] == ["brush", "rect", "poly"]
    assert [c.name for c in config.smart_controls] == ["rect", "kp"]
    assert config.image_keys == ("image",)
    assert config.labels_of("kp") == ("Cat", "Dog")
    assert spec["brush"].result_type == "brushlabels"


def test_all_fixture_payload_configs_parse_the_same():
    texts = set()
    for name in ("predict_batch_1.json", "predict_interactive.json"):
        texts.add(json.loads((FIXTURES / name).read_text())["label_config"])
    webhook = json.loads((FIXTURES / "webhook_annotation_created_brush.json").read_text())
    texts.add(webhook["project"]["label_config"])
    for text in texts:
        assert {c.name for c in parse_label_config(text).output_controls} >= {"brush"}


def test_control_for_matches_name_and_result_type():
    config = parse_label_config(FIXTURE_CONFIG)
    assert config.control_for("rect", "RectangleLabels").name == "rect"
    assert config.control_for("rect", "brushlabels") is None
    assert config.control_for("missing") is None
    with pytest.raises(ValueError, match="control 'missing' not in the label config"):
        config.labels_of("missing")


def test_labels_with_tools_become_labelled_variants():
    xml = """<View>
      <Image name="img" value="$url"/>
      <Labels name="tag" toName="img"><Label value="Car"/><Label value="Tree" alias="tree-alias"/></Labels>
      <Brush name="br" toName="img"/>
      <Polygon name="pg" toName="img"/>
      <KeyPoint name="kp" toName="img" smart="true"/>
    </View>"""
    config = parse_label_config(xml)
    by_type = {c.type: c for c in config.controls if c.name == "tag"}
    assert set(by_type) == {"BrushLabels", "PolygonLabels", "KeyPointLabels"}
    assert by_type["BrushLabels"].labels == ("Car", "tree-alias")
    assert by_type["BrushLabels"].to_name == "img" and by_type["BrushLabels"].image_value_key == "url"
    assert all(c.via_labels for c in by_type.values())
    assert not any(c.via_labels for c in parse_label_config(FIXTURE_CONFIG).controls)
    assert {c.type for c in config.output_controls} == {"BrushLabels", "PolygonLabels"}
    assert [(c.name, c.type) for c in config.smart_controls] == [("tag", "KeyPointLabels")]
    assert config.control_for("tag", "polygonlabels").type == "PolygonLabels"


def test_labels_pair_only_with_tools_on_the_same_image():
    xml = """<View>
      <Image name="a" value="$first"/><Image name="b" value="$second"/>
      <Labels name="tag" toName="a"><Label value="X"/></Labels>
      <Polygon name="pg" toName="a"/>
      <Brush name="br" toName="b"/>
    </View>"""
    config = parse_label_config(xml)
    assert [(c.name, c.type, c.to_name) for c in config.output_controls] == [("tag", "PolygonLabels", "a")]


def test_region_controls_leave_out_smart_prompts_unless_every_output_is_smart():
    assert [c.name for c in parse_label_config(FIXTURE_CONFIG).region_controls] == ["brush", "poly"]
    only_smart = """<View><Image name="i" value="$image"/>
      <RectangleLabels name="r" toName="i" smart="true"><Label value="X"/></RectangleLabels>
      <KeyPointLabels name="k" toName="i" smart="true"><Label value="X"/></KeyPointLabels>
    </View>"""
    assert [c.name for c in parse_label_config(only_smart).region_controls] == ["r"]


def test_smart_only_and_several_images():
    xml = """<View>
      <Image name="a" value="$first"/><Image name="b" value="$second"/>
      <RectangleLabels name="r" toName="b" smartOnly="true"><Label value="X"/></RectangleLabels>
      <BrushLabels name="m" toName="a"><Label value="X"/></BrushLabels>
    </View>"""
    config = parse_label_config(xml)
    assert config.image_keys == ("first", "second")
    r = config.control_for("r")
    assert r.smart and r.to_name == "b" and r.image_value_key == "second"
    assert config.control_for("m").image_value_key == "first"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<View><Image name='i' value='$x'", "invalid XML"),
        ("", "empty string"),
        ("   ", "empty string"),
        (
            "<View><Text name='t' value='$t'/><Labels name='l' toName='t'><Label value='A'/></Labels></View>",
            "no <Image> tag",
        ),
        (
            "<View><Image name='i' value='http://x/a.png'/>"
            "<BrushLabels name='b' toName='i'><Label value='A'/></BrushLabels></View>",
            "no <Image> tag",
        ),
        (
            "<View><Image name='i' value='$x'/><KeyPointLabels name='k' toName='i'>"
            "<Label value='A'/></KeyPointLabels></View>",
            "no supported control.*k:KeyPointLabels",
        ),
        (
            "<View><Image name='i' value='$x'/><BrushLabels name='b' toName='elsewhere'>"
            "<Label value='A'/></BrushLabels></View>",
            "no supported control",
        ),
        ("<View><Image name='i' value='$x'/></View>", "no supported control.*none"),
    ],
)
def test_errors_name_the_problem(xml, message):
    with pytest.raises(ValueError, match=message):
        parse_label_config(xml)


def test_non_string_config_is_rejected():
    with pytest.raises(ValueError, match="expected XML text, got bytes"):
        parse_label_config(FIXTURE_CONFIG.encode())


def test_parsed_configs_are_cached_and_the_cache_is_bounded_in_bytes(monkeypatch):
    first = parse_label_config(FIXTURE_CONFIG)
    assert parse_label_config(FIXTURE_CONFIG) is first
    small = ByteLRUCache(64 << 10, sizeof=lambda entry: entry[0])
    monkeypatch.setattr(label_config, "_parsed", small)
    template = (
        "<View><Image name='i' value='$x'/>"
        "<BrushLabels name='b{}' toName='i'><Label value='A'/></BrushLabels></View>"
    )
    for i in range(400):
        parse_label_config(template.format(i))
    assert small.nbytes <= 64 << 10 and small.evictions > 0
    assert len(small) == (64 << 10) // (4 * len(template.format(399)))  # 4 bytes per character
    newest = parse_label_config(template.format(399))
    assert parse_label_config(template.format(399)) is newest and small.hits >= 1
