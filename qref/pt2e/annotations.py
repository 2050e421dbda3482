"""Reading the quantizer's annotations that prepare left on nodes."""

ANNOTATION_KEY = "quantization_annotation"


def annotation(node):
    """The node's quantization annotation, or None when it has none worth the name."""
    a = node.meta.get(ANNOTATION_KEY)
    if a is None or (not a.input_qspec_map and a.output_qspec is None):
        return None
    return a
