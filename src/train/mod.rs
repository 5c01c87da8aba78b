//! Fine-tuning with ITC, ITM and language-modelling losses, and evaluation.
