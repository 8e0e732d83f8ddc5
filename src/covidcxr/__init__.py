"""covidcxr: chest X-ray COVID-19 / pneumonia detectors that are hard to fool with shortcuts."""

__version__ = "0.1.0"
