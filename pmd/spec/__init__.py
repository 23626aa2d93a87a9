"""The specifications pmd speaks, as vocabulary: constants, layouts and strict codecs (standard library only)."""
