"""UserService and AuthService: wire <-> domain, nothing more."""

from __future__ import annotations

from booking.v1 import auth_pb2, auth_pb2_grpc, user_pb2, user_pb2_grpc
from service import auth, convert, pagination, passwords
from service.config import Config
from service.errors import PermissionDenied, Unauthenticated
from service.grpc_types import Context
from service.policy import scope_to_caller
from service.ratelimit import PerKeyRate, peer_host, retry_after
from service.validation import Validator, field_mask_paths
from storage import users as store
from storage.database import Database
from storage.errors import SignUpThrottled
from storage.models import Role


class UserService(user_pb2_grpc.UserServiceServicer):
    def __init__(self, db: Database, config: Config, authenticator: auth.Authenticator) -> None:
        self.db = db
        self.config = config
        self.authenticator = authenticator
        self.signups = PerKeyRate(config.signups_per_minute, 60.0)

    async def CreateUser(
        self, request: user_pb2.CreateUserRequest, context: Context
    ) -> user_pb2.CreateUserResponse:
        caller = auth.current()
        v = Validator()
        email = v.email("email", request.email)
        problem = passwords.problem(request.password)
        if problem:
            v.fail("password", problem)
        role = v.enum("role", request.role, convert.ROLES) or Role.CLIENT
        v.check()
        if caller.role is not Role.ADMIN:
            if role is not Role.CLIENT:
                raise PermissionDenied(detail=f"only an ADMIN may create {role.value} users")
            # Operators register clients at the desk; everyone else only
            # through self sign-up, when it is on.
            if caller.role is not Role.OPERATOR and not self.config.allow_self_signup:
                if caller.user is None:
                    raise Unauthenticated(detail="self sign-up is disabled")
                raise PermissionDenied(detail="self sign-up is disabled")
        if caller.user is None:
            wait = self.signups.take(peer_host(context.peer()))
            if wait > 0:
                raise SignUpThrottled(retry_after_seconds=retry_after(wait))
        user = await store.create(
            self.db,
            email=email,
            password_hash=await passwords.hash_password(request.password),
            role=role,
        )
        return user_pb2.CreateUserResponse(user=convert.user(user))

    async def GetUser(
        self, request: user_pb2.GetUserRequest, context: Context
    ) -> user_pb2.GetUserResponse:
        caller = auth.current().require_user()
        v = Validator()
        user_id = v.uuid("id", request.id)
        v.check()
        scope_to_caller(caller, user_id, what="read itself")
        return user_pb2.GetUserResponse(user=convert.user(await store.get(self.db, user_id)))

    async def ListUsers(
        self, request: user_pb2.ListUsersRequest, context: Context
    ) -> user_pb2.ListUsersResponse:
        v = Validator()
        size = v.page_size(request.page_size)
        role = v.enum("role", request.role, convert.ROLES)
        active = request.active if request.HasField("active") else None
        v.check()
        filters = ["users", role, active]
        page = await store.list_(
            self.db,
            role=role,
            active=active,
            after=pagination.time_and_id(request.page_token, filters),
            limit=size,
        )
        return user_pb2.ListUsersResponse(
            users=[convert.user(u) for u in page.items],
            next_page_token=pagination.next_token(
                page, lambda item: [item.created_at.isoformat(), item.id], filters
            ),
        )

    async def UpdateUser(
        self, request: user_pb2.UpdateUserRequest, context: Context
    ) -> user_pb2.UpdateUserResponse:
        caller = auth.current().require_user()
        v = Validator()
        user_id = v.uuid("user.id", request.user.id)
        paths = field_mask_paths(
            list(request.update_mask.paths), {"email", "password", "role", "active"}, v
        )
        email = v.email("user.email", request.user.email) if "email" in paths else None
        if "password" in paths and (problem := passwords.problem(request.password)):
            v.fail("password", problem)
        role = (
            v.enum("user.role", request.user.role, convert.ROLES, required=True)
            if "role" in paths
            else None
        )
        v.check()
        if caller.role is not Role.ADMIN:
            if user_id != caller.id:
                raise PermissionDenied(detail="only an ADMIN may change other users")
            if paths & {"role", "active"}:
                raise PermissionDenied(detail="only an ADMIN may change role or active")
        user = await store.update(
            self.db,
            user_id,
            email=email,
            password_hash=await passwords.hash_password(request.password)
            if "password" in paths
            else None,
            role=role,
            active=request.user.active if "active" in paths else None,
        )
        # This server forgets the user's cached tokens now; the others on
        # the NOTIFY the update's trigger sends.
        self.authenticator.forget_user(user.id)
        return user_pb2.UpdateUserResponse(user=convert.user(user))


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, authenticator: auth.Authenticator) -> None:
        self.authenticator = authenticator

    async def Login(
        self, request: auth_pb2.LoginRequest, context: Context
    ) -> auth_pb2.LoginResponse:
        v = Validator()
        email = v.text("email", request.email, max_length=254)
        if not request.password:
            v.fail("password", "required")
        elif len(request.password) > 1024:
            v.fail("password", "too long")
        v.check()
        token, expires, user = await self.authenticator.login(email, request.password)
        return auth_pb2.LoginResponse(
            access_token=token, expire_time=convert.timestamp(expires), user=convert.user(user)
        )

    async def WhoAmI(
        self, request: auth_pb2.WhoAmIRequest, context: Context
    ) -> auth_pb2.WhoAmIResponse:
        return auth_pb2.WhoAmIResponse(user=convert.user(auth.current().require_user()))

    async def Logout(
        self, request: auth_pb2.LogoutRequest, context: Context
    ) -> auth_pb2.LogoutResponse:
        await self.authenticator.logout(auth.current())
        return auth_pb2.LogoutResponse()
