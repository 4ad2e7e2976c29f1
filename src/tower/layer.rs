//! The layer and its service: extract, reserve, call, settle.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::StatusCode;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{MeteredBody, Settle};
use super::extract::Extract;
use super::hold::Hold;
use super::reply::{add_rate_limit_headers, denial_response, error_response, DenialResponder};
use crate::denial::Denial;
use crate::headers::RateLimitHeaders;
use crate::limiter::{Held, Limiter};
use crate::request::Usage;

/// Puts a [`Limiter`] in front of a service: see the [module docs](crate::tower).
pub struct TollgateLayer<L, E> {
    limiter: Arc<L>,
    extract: Arc<E>,
    deny: DenialResponder,
}

impl<L, E> TollgateLayer<L, E> {
    /// Reserve through `limiter` for what `extract` says each request is.
    pub fn new(limiter: L, extract: E) -> Self {
        TollgateLayer {
            limiter: Arc::new(limiter),
            extract: Arc::new(extract),
            deny: Arc::new(denial_response),
        }
    }

    /// Answer denials with `respond` instead of [`denial_response`].
    #[must_use]
    pub fn on_denial(
        mut self,
        respond: impl Fn(&Denial) -> http::Response<Bytes> + Send + Sync + 'static,
    ) -> Self {
        self.deny = Arc::new(respond);
        self
    }
}

impl<L, E> Clone for TollgateLayer<L, E> {
    fn clone(&self) -> Self {
        TollgateLayer {
            limiter: Arc::clone(&self.limiter),
            extract: Arc::clone(&self.extract),
            deny: Arc::clone(&self.deny),
        }
    }
}

impl<S, L, E> Layer<S> for TollgateLayer<L, E> {
    type Service = Tollgate<S, L, E>;

    fn layer(&self, inner: S) -> Self::Service {
        Tollgate {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`TollgateLayer`] wraps around `S`.
pub struct Tollgate<S, L, E> {
    inner: S,
    layer: TollgateLayer<L, E>,
}

impl<S: Clone, L, E> Clone for Tollgate<S, L, E> {
    fn clone(&self) -> Self {
        Tollgate {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

/// The future of a [`Tollgate`] call.
pub type ResponseFuture<B, L, Err> =
    Pin<Box<dyn Future<Output = Result<http::Response<MeteredBody<B, L>>, Err>> + Send>>;

impl<S, L, E, ReqBody, ResBody> Service<http::Request<ReqBody>> for Tollgate<S, L, E>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    L: Limiter + 'static,
    E: Extract<ReqBody>,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody, L>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, L, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready serves this call; a fresh clone is kept.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let extracted = match layer.extract.extract(&request) {
                Ok(extracted) => extracted,
                Err(rejection) => {
                    let reply =
                        error_response(rejection.status, rejection.code, &rejection.message);
                    return Ok(reply.map(MeteredBody::full));
                }
            };
            let reservation = match layer.limiter.check_and_reserve(&extracted.request()).await {
                Ok(reservation) => reservation,
                Err(denial) => return Ok((layer.deny)(&denial).map(MeteredBody::full)),
            };
            let rate_limits = RateLimitHeaders::from_status(reservation.rate_limits());
            let hold = Hold::new(reservation);
            request.extensions_mut().insert(hold.clone());
            // An error (or this future dropped: the client hung up) drops the last
            // handle on the hold and releases the reservation.
            let response = inner.call(request).await?;
            let (mut parts, body) = response.into_parts();
            add_rate_limit_headers(&mut parts.headers, &rate_limits);
            let Some(usage) = parts.extensions.get::<Usage>().copied() else {
                let settle = Settle {
                    limiter: layer.limiter,
                    hold,
                };
                return Ok(http::Response::from_parts(
                    parts,
                    MeteredBody::metered(body, settle),
                ));
            };
            if let Some(reservation) = hold.take() {
                match layer.limiter.commit_usage(reservation, usage).await {
                    Ok(receipt) => {
                        parts.extensions.insert(receipt);
                    }
                    Err(error) => {
                        // Refused for good: nothing was charged, so nothing is served.
                        let reply = error_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "store_unavailable",
                            &error.to_string(),
                        );
                        return Ok(reply.map(MeteredBody::full));
                    }
                }
            }
            Ok(http::Response::from_parts(parts, MeteredBody::plain(body)))
        })
    }
}
