"""The site side of Tributary: increment readers, packing, the DeepSpeed engine, the Worker."""
