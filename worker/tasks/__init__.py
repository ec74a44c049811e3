"""Task modules, one per queue role: inference (cpu/gpu), training (training)."""
