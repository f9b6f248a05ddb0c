"""Parse a Label Studio label config into the controls samsem reads from and writes to.

Parsing uses the SDK's ``label_studio_sdk.label_interface.LabelInterface``; results are cached
(LRU, keyed by the config text) because the backend sees the same config on every request.

Supported image controls:

* ``BrushLabels``, ``PolygonLabels``, ``RectangleLabels`` over an ``Image``: *output* controls
  (where predictions are written);
* ``KeyPointLabels`` / ``RectangleLabels`` with ``smart="true"`` (or ``smartOnly="true"``): *smart*
  controls (interactive prompts);
* a generic ``Labels`` control sharing an ``Image`` with a ``Brush`` / ``Polygon`` / ``Rectangle`` /
  ``KeyPoint`` tool. Label Studio writes such a region as one result whose ``from_name`` is the
  ``Labels`` control and whose ``type`` is the tool's labelled variant (e.g. ``brushlabels``), so it
  is represented here as a ``ControlSpec`` named after the ``Labels`` control with ``type``
  ``"BrushLabels"`` etc. (the tool's ``smart`` flag applies).

Other controls over an Image (e.g. ``EllipseLabels``, ``Choices``) appear in
``ProjectConfig.controls`` but are neither outputs nor smart controls.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface

from samsem_plugin.cache import ByteLRUCache

OUTPUT_TYPES = ("BrushLabels", "PolygonLabels", "RectangleLabels")
"""Control types samsem writes predictions to."""
SMART_TYPES = ("KeyPointLabels", "RectangleLabels")
"""Control types that send interactive prompts when ``smart="true"``."""
_TOOLS_FOR_LABELS = ("Brush", "Polygon", "Rectangle", "KeyPoint")
PARSED_CONFIG_CACHE_BYTES = 32 << 20
"""Bound of the parsed-config cache. A parsed config is counted as 4 bytes per character of its
XML (measured: ~2.2 for a config of 10,000 labels), so ~8 MiB of distinct configs stay parsed;
the XML text itself is not kept (the cache is keyed by its BLAKE2b digest)."""
_BYTES_PER_CHARACTER = 4


@dataclass(frozen=True)
class ControlSpec:
    """One control tag over an Image.

    Attributes:
        name: the control's ``name`` (``from_name`` of its results).
        type: the tag, e.g. ``"BrushLabels"``, ``"PolygonLabels"``, ``"RectangleLabels"``,
            ``"KeyPointLabels"`` (``"BrushLabels"`` etc. also for ``Labels`` + ``Brush``).
        to_name: ``name`` of the Image tag it labels.
        labels: label values (aliases where given) in config order.
        smart: the control (or its tool) has ``smart="true"`` / ``smartOnly="true"``.
        image_value_key: the task data key the Image reads (``"image"`` for ``value="$image"``).
        via_labels: a generic ``Labels`` control paired with a tool (``type`` is the tool's
            labelled variant); one ``Labels`` control can give several specs, one per tool.
    """

    name: str
    type: str
    to_name: str
    labels: tuple[str, ...]
    smart: bool
    image_value_key: str
    via_labels: bool = False

    @property
    def result_type(self) -> str:
        """The ``type`` of this control's results, e.g. ``"brushlabels"``."""
        return self.type.lower()


@dataclass(frozen=True)
class ProjectConfig:
    """The image controls of one label config.

    Attributes:
        controls: every control over an Image (including merged ``Labels`` + tool variants).
        output_controls: the controls predictions can be written to (``OUTPUT_TYPES``).
        smart_controls: smart ``KeyPointLabels`` / ``RectangleLabels`` controls.
        image_keys: task data keys of the Image tags (``"image"`` for ``value="$image"``), in order.
    """

    controls: tuple[ControlSpec, ...]
    output_controls: tuple[ControlSpec, ...]
    smart_controls: tuple[ControlSpec, ...]
    image_keys: tuple[str, ...]

    @property
    def region_controls(self) -> tuple[ControlSpec, ...]:
        """The output controls batch pre-annotation writes to and learning reads: those that are not
        smart, or every output control when all are smart. A smart rectangle next to a brush is a
        prompt for SAM (writing each mask there too would double every object); alone, it is where
        the annotation is drawn."""
        plain = tuple(control for control in self.output_controls if not control.smart)
        return plain or self.output_controls

    def labels_of(self, control_name: str) -> tuple[str, ...]:
        """Labels of the control named ``control_name``; ValueError if there is none."""
        for control in self.controls:
            if control.name == control_name:
                return control.labels
        names = sorted({c.name for c in self.controls})
        raise ValueError(f"control {control_name!r} not in the label config (controls: {names})")

    def control_for(self, from_name: str, result_type: str | None = None) -> ControlSpec | None:
        """The control a result with this ``from_name`` (and ``type``, any case) belongs to, or None."""
        for control in self.controls:
            if control.name == from_name and (
                result_type is None or control.result_type == str(result_type).lower()
            ):
                return control
        return None


def _is_true(attributes: dict, *keys: str) -> bool:
    return any(str(attributes.get(key, "")).strip().lower() == "true" for key in keys)


def _image_keys(interface: LabelInterface) -> dict[str, str]:
    """Image tag name -> task data key, for Images reading task data (``value="$key"``)."""
    keys = {}
    for tag in interface.objects:
        value = str(getattr(tag, "value", "") or "")
        if tag.tag == "Image" and value.startswith("$") and len(value) > 1:
            keys[tag.name] = value[1:]
    return keys


def _specs_of(
    control, tag_type: str, images: dict[str, str], labels, smart: bool, via_labels: bool = False
) -> list[ControlSpec]:
    return [
        ControlSpec(
            name=control.name,
            type=tag_type,
            to_name=to_name,
            labels=tuple(str(label) for label in labels),
            smart=smart,
            image_value_key=images[to_name],
            via_labels=via_labels,
        )
        for to_name in control.to_name
        if to_name in images
    ][:1]  # a control over several images: the first one


def _parse(xml: str) -> ProjectConfig:
    try:
        interface = LabelInterface(xml)
    except Exception as error:  # the SDK raises lxml / its own / pydantic errors
        raise ValueError(f"label config: invalid XML: {error}") from None
    images = _image_keys(interface)
    if not images:
        raise ValueError('label config: no <Image> tag reading task data (value="$key")')
    controls: list[ControlSpec] = []
    for control in interface.controls:
        attributes = dict(control.attr or {})
        smart = _is_true(attributes, "smart", "smartOnly")
        if control.tag != "Labels":
            controls += _specs_of(control, control.tag, images, getattr(control, "labels", ()) or (), smart)
            continue
        for tool in interface.controls:
            if tool.tag in _TOOLS_FOR_LABELS and set(tool.to_name) & set(control.to_name):
                tool_smart = _is_true(dict(tool.attr or {}), "smart", "smartOnly")
                controls += _specs_of(
                    control, f"{tool.tag}Labels", images, control.labels or (), tool_smart, via_labels=True
                )
    output = tuple(c for c in controls if c.type in OUTPUT_TYPES)
    if not output:
        found = sorted({f"{c.name}:{c.type}" for c in controls}) or "none"
        raise ValueError(
            f"label config: no supported control: expected one of {', '.join(OUTPUT_TYPES)} "
            f"(or Labels with Brush/Polygon/Rectangle) over an Image; image controls found: {found}"
        )
    smart_controls = tuple(c for c in controls if c.smart and c.type in SMART_TYPES)
    return ProjectConfig(
        controls=tuple(controls),
        output_controls=output,
        smart_controls=smart_controls,
        image_keys=tuple(dict.fromkeys(images.values())),
    )


_parsed: ByteLRUCache[tuple[int, ProjectConfig]] = ByteLRUCache(
    PARSED_CONFIG_CACHE_BYTES, sizeof=lambda entry: entry[0]
)


def parse_label_config(xml: str) -> ProjectConfig:
    """Parse a Label Studio label config (XML text) into a :class:`ProjectConfig`.

    Cached (LRU, bounded in bytes: :data:`PARSED_CONFIG_CACHE_BYTES`). Raises ValueError naming
    the problem for a non-string or empty config, invalid XML, no Image tag, or no supported output
    control.
    """
    if not isinstance(xml, str):
        raise ValueError(f"label config: expected XML text, got {type(xml).__name__}")
    if not xml.strip():
        raise ValueError("label config: expected XML text, got an empty string")
    key = hashlib.blake2b(xml.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    cached = _parsed.get(key)
    if cached is not None:
        return cached[1]
    config = _parse(xml)
    _parsed.put(key, (_BYTES_PER_CHARACTER * len(xml), config))
    return config
