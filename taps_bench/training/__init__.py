"""Training drafters: corpora, target feature extraction, the EAGLE-2/HASS objectives, recipe builds."""
