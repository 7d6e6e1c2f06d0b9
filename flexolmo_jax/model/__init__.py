"""The FlexOlmo model: OLMo-2 layers, the router and MoE layer, dispatch backends, the decoder."""
