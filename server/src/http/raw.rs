//! A JSON payload whose bytes are already serialised (by Postgres, or the
//! cache) but whose schema is documented as `T` in the OpenAPI spec. Rows
//! projected inside Postgres are spliced into the response as text, never
//! parsed and re-serialised by the server.

use poem::{IntoResponse, Response};
use poem_openapi::payload::Payload;
use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses, MetaSchemaRef, Registry};
use poem_openapi::{types::Type, ApiResponse};
use std::marker::PhantomData;

pub struct RawJson<T>(pub String, PhantomData<T>);

impl<T> RawJson<T> {
    pub fn new(body: String) -> Self {
        Self(body, PhantomData)
    }
}

impl<T: Type + Send> Payload for RawJson<T> {
    const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: Send> IntoResponse for RawJson<T> {
    fn into_response(self) -> Response {
        Response::builder()
            .content_type("application/json; charset=utf-8")
            .body(self.0)
    }
}

impl<T: Type + Send> ApiResponse for RawJson<T> {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "",
                status: Some(200),
                status_range: None,
                content: vec![MetaMediaType {
                    content_type: Self::CONTENT_TYPE,
                    schema: Self::schema_ref(),
                }],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}
