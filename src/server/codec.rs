//! The protobuf codec of the API: prost's, except that a message that does not decode
//! (for example a `string` field holding invalid UTF-8) is the caller's fault and is
//! answered `INVALID_ARGUMENT` instead of prost's default `INTERNAL`.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, ProstCodec};
use tonic::Status;

/// Codec used by every generated client and server of the API.
#[derive(Debug, Clone)]
pub struct ApiCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for ApiCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

/// Decoder that decodes with prost and answers failures `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ApiDecoder<U> {
    _type: PhantomData<U>,
}

impl<T, U> Codec for ApiCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ApiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ApiDecoder { _type: PhantomData }
    }
}

impl<U> Decoder for ApiDecoder<U>
where
    U: prost::Message + Default + Send + 'static,
{
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|error| {
            Status::invalid_argument(format!("request is not a valid message: {error}"))
        })
    }
}
