//! The codec of the `quota.v1` servers: prost's, except that a request body that does not decode as
//! its message is the client's fault, INVALID_ARGUMENT with ErrorInfo `MALFORMED_REQUEST` naming the
//! message type, where prost's codec answers INTERNAL, the code of a server bug.
//!
//! Only the servers use it (see `build.rs`); clients keep prost's codec, since a response that does not
//! decode is not the caller's fault.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstEncoder};

use super::status;

/// Encodes responses as prost does and decodes requests with [`RequestDecoder`].
#[derive(Debug, Clone)]
pub struct RequestCodec<T, U> {
    prost: ProstCodec<T, U>,
}

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        Self { prost: ProstCodec::new() }
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.prost.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder { _message: PhantomData }
    }
}

/// Decodes one request message; a body that is not one is a malformed request.
#[derive(Debug, Clone)]
pub struct RequestDecoder<U> {
    _message: PhantomData<U>,
}

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|error| status::malformed_request(&message_type::<U>(), &error))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The protobuf name of a generated message, e.g. `quota.v1.CheckAndReserveRequest`: every message the
/// servers decode is generated into `crate::proto` from the `quota.v1` package.
fn message_type<U>() -> String {
    let rust_name = std::any::type_name::<U>();
    format!("quota.v1.{}", rust_name.rsplit("::").next().unwrap_or(rust_name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    #[test]
    fn message_types_are_protobuf_names() {
        assert_eq!(message_type::<proto::CheckAndReserveRequest>(), "quota.v1.CheckAndReserveRequest");
        assert_eq!(message_type::<proto::GetTenantRequest>(), "quota.v1.GetTenantRequest");
    }
}
