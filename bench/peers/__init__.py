"""Hand-written peers the bridge is compared with."""
