"""Foundations every stage uses: the class table, CT volumes with their geometry, the intensity window,
anatomical sides, atomic file writes and the settings dataclasses' dict round trips."""
