//! mPLUG in candle: vision encoder, text encoder, fusion, heads, decoder, generation and
//! checkpoint loading.
