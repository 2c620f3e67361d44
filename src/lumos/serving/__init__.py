"""Serving: the KServe model server over an ONNX export, and promotion (registry record +
InferenceService manifest) of a model that passed its evaluation gate."""
