//! What a gateway asks about, and what it reports back.

/// How the caller identifies the API key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    /// The secret the client presented (e.g. the bearer token); it is hashed with
    /// SHA-256 and looked up by digest, never stored.
    Secret(&'a str),
    /// A key id, for gateways that have already authenticated the client.
    KeyId(&'a str),
}

/// One request to admit. Borrowed, so building one allocates nothing.
///
/// ```
/// use tollgate::Request;
/// let request = Request::with_secret("sk-live-abc", "gpt-4o-mini")
///     .input_tokens(1_200)
///     .max_output_tokens(400);
/// assert_eq!(request.max_output_tokens, Some(400));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// Who is asking.
    pub credential: Credential<'a>,
    /// The model asked for, as named in the price table.
    pub model: &'a str,
    /// Estimated input (prompt) tokens.
    pub input_tokens: u32,
    /// The request's `max_tokens`; when absent the key's, model's, workspace's or
    /// policy default is reserved.
    pub max_output_tokens: Option<u32>,
    /// How many outputs the request asks for (OpenAI's `n`): the output worst case
    /// (the request's or the default) is held this many times. 1 unless set; 0 is
    /// taken as 1.
    pub outputs: u32,
    /// The end user the request is made for (OpenAI's `user` field, or an id the
    /// gateway assigns), for a workspace's per-end-user limits. `None`: the request is
    /// not limited at the end-user level, even in a workspace that sets such limits.
    /// At most [`MAX_END_USER_LEN`] bytes and no control characters; anything else is
    /// refused with [`DenialReason::InvalidEndUser`](crate::DenialReason::InvalidEndUser).
    pub end_user: Option<&'a str>,
}

/// The longest end-user id accepted, in bytes (see [`Request::end_user`]).
pub const MAX_END_USER_LEN: usize = 256;

impl<'a> Request<'a> {
    /// A request authenticated by a presented secret.
    #[must_use]
    pub fn with_secret(secret: &'a str, model: &'a str) -> Self {
        Self::new(Credential::Secret(secret), model)
    }

    /// A request for a key id the gateway has authenticated itself.
    #[must_use]
    pub fn with_key_id(key_id: &'a str, model: &'a str) -> Self {
        Self::new(Credential::KeyId(key_id), model)
    }

    /// A request with no input tokens and the default output reservation.
    #[must_use]
    pub fn new(credential: Credential<'a>, model: &'a str) -> Self {
        Request {
            credential,
            model,
            input_tokens: 0,
            max_output_tokens: None,
            outputs: 1,
            end_user: None,
        }
    }

    /// Set the input-token estimate.
    #[must_use]
    pub fn input_tokens(mut self, tokens: u32) -> Self {
        self.input_tokens = tokens;
        self
    }

    /// Set `max_tokens`.
    #[must_use]
    pub fn max_output_tokens(mut self, tokens: u32) -> Self {
        self.max_output_tokens = Some(tokens);
        self
    }

    /// Set how many outputs are asked for (OpenAI's `n`): the output worst case is
    /// held `outputs` times.
    ///
    /// ```
    /// use tollgate::Request;
    /// let request = Request::with_secret("sk-live-abc", "gpt-4o-mini")
    ///     .max_output_tokens(100)
    ///     .outputs(8); // 800 output tokens held
    /// assert_eq!(request.outputs, 8);
    /// ```
    #[must_use]
    pub fn outputs(mut self, outputs: u32) -> Self {
        self.outputs = outputs;
        self
    }

    /// Set the end user the request is made for (OpenAI's `user` field): in a
    /// workspace with `end_user_limits`, the request also counts against that end
    /// user's own rates and budget. Checked when the request is admitted: 1 to
    /// [`MAX_END_USER_LEN`] bytes without control characters.
    ///
    /// ```
    /// use tollgate::Request;
    /// let request = Request::with_secret("sk-live-abc", "gpt-4o-mini").end_user("user-42");
    /// assert_eq!(request.end_user, Some("user-42"));
    /// ```
    #[must_use]
    pub fn end_user(mut self, id: &'a str) -> Self {
        self.end_user = Some(id);
        self
    }
}

/// What a request really used, as the provider reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input (prompt) tokens.
    pub input_tokens: u32,
    /// Output (completion) tokens.
    pub output_tokens: u32,
}

impl Usage {
    /// Usage of `input_tokens` in and `output_tokens` out.
    #[must_use]
    pub fn new(input_tokens: u32, output_tokens: u32) -> Self {
        Usage {
            input_tokens,
            output_tokens,
        }
    }
}

/// The token of an `Authorization` header's value `Bearer TOKEN`, the scheme matched
/// in any case (RFC 9110: `bearer` and `BEARER` too); `None` for another scheme or an
/// empty token. For gateways that pass it on as [`Credential::Secret`].
///
/// ```
/// assert_eq!(tollgate::bearer_token("Bearer sk-123"), Some("sk-123"));
/// assert_eq!(tollgate::bearer_token("bearer sk-123"), Some("sk-123"));
/// assert_eq!(tollgate::bearer_token("Basic abc"), None);
/// assert_eq!(tollgate::bearer_token("Bearer "), None);
/// ```
#[must_use]
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}
