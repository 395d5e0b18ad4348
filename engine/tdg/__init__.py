"""Template-based data generation (TDG): template language, whitelist expressions, compiler, sandbox,
verifier and instantiator. The method that drives them is engine/methods/tdg.py."""
